"""What Ray Serve's HTTP proxy adds to a request, against the same ASGI app served straight
from the replica's process (how the gateway serves today). It decides how the chart meets
KubeRay's health contract (README, "Kubernetes"): routing the public API through Serve's
proxies, or the gateway answering ``/-/healthz`` itself.

Both paths run the same FastAPI app in a Ray Serve replica on the same local cluster; one
is reached through Serve's proxy (HTTP -> proxy actor -> replica over Ray), the other on a
port the replica's own uvicorn binds. Requests alternate between the two, one at a time:
a small JSON answer, and a stream of 32 server-sent events (time to first byte and to the
last one). Run: ``.venv/bin/python bench/ingress.py [--requests 300]``.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import requests

CHUNKS = 32


def build_app():
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/small")
    def small():
        return {"object": "list", "data": [{"id": "upscaled"}]}

    @app.get("/stream")
    async def stream():
        async def events():
            for index in range(CHUNKS):
                yield f"data: {json.dumps({'index': index, 'text': ' token'})}\n\n"
                await asyncio.sleep(0)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(direct_port: int):
    from ray import serve

    app = build_app()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, port: int):
            import uvicorn

            # The same app on the replica's own port: the gateway's way (no proxy hop).
            server = uvicorn.Server(uvicorn.Config(build_app(), host="127.0.0.1", port=port, log_level="warning"))
            threading.Thread(target=server.run, daemon=True).start()

    serve.run(Ingress.bind(direct_port), name="ingress", route_prefix="/")


def timed_get(url: str, stream: bool) -> tuple[float, float]:
    start = time.perf_counter()
    with requests.get(url, stream=stream, timeout=30) as reply:
        reply.raise_for_status()
        if not stream:
            reply.json()
            elapsed = time.perf_counter() - start
            return elapsed, elapsed
        first = None
        for line in reply.iter_lines():
            if line and first is None:
                first = time.perf_counter() - start
        return first, time.perf_counter() - start


def wait_until_up(url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within 120 s")


def measure(bases: dict[str, str], count: int) -> dict:
    samples = {name: {"small": [], "first": [], "last": []} for name in bases}
    for _ in range(count):
        for name, base in bases.items():  # alternate: both paths see the same machine load
            samples[name]["small"].append(timed_get(base + "/small", stream=False)[0])
            first, last = timed_get(base + "/stream", stream=True)
            samples[name]["first"].append(first)
            samples[name]["last"].append(last)
    return {name: {key: {"p50_ms": 1e3 * statistics.median(v), "p90_ms": 1e3 * statistics.quantiles(v, n=10)[-1]} for key, v in s.items()} for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests of each kind per path (default 300)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "ingress-results.json", help="where the figures go")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    proxy_port, direct_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
    try:
        deploy(direct_port)
        bases = {"serve_proxy": f"http://127.0.0.1:{proxy_port}", "direct": f"http://127.0.0.1:{direct_port}"}
        for base in bases.values():
            wait_until_up(base + "/small")
        measure(bases, 20)  # warm both
        figures = measure(bases, args.requests)
    finally:
        serve.shutdown()
        ray.shutdown()
    added = {key: figures["serve_proxy"][key]["p50_ms"] - figures["direct"][key]["p50_ms"] for key in ("small", "first", "last")}
    result = {"requests": args.requests, "chunks": CHUNKS, "paths": figures, "proxy_adds_p50_ms": added}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, rows in figures.items():
        print(f"{name:12s} " + "  ".join(f"{key} p50 {v['p50_ms']:.2f} ms p90 {v['p90_ms']:.2f} ms" for key, v in rows.items()))
    print("Serve's proxy adds (p50): " + ", ".join(f"{key} {ms:+.2f} ms" for key, ms in added.items()))


if __name__ == "__main__":
    main()
