"""Many streamed chat completions at once from a process of their own (the server's process
then spends its CPU on serving, not on the clients):

    python -m tests.services.gateway.http_load URL N BODY_JSON

prints one JSON line: each request's HTTP status, the streamed text, the finish reason and
the error object of a refusal, in order.
"""

import asyncio
import json
import sys

import aiohttp


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, json={**body, "stream": True}) as reply:
        if reply.status != 200:
            return {"status": reply.status, "error": (await reply.json())["error"]}
        text, finish = [], None
        async for line in reply.content:
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:
                return {"status": 200, "error": event["error"]}
            for choice in event["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
        return {"status": 200, "text": "".join(text), "finish_reason": finish}


async def main(url: str, n: int, body: dict) -> list[dict]:
    connector = aiohttp.TCPConnector(limit=0)  # every request on its own connection, at once
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        return await asyncio.gather(*(_one(session, url + "/v1/chat/completions", body) for _ in range(n)))


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])))))
