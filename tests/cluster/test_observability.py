"""Metrics scraped by a real Prometheus server, and the official `openai` client, against
the application on the local Ray cluster."""

import os
import shutil
import subprocess
from urllib.parse import urlparse

import openai
import pytest
import requests

from services.pb.eft.v1 import eft_pb2
from tests.cluster.helpers import chat, free_port, wait_for

ACCEPTANCE_RATE = "sum(rate(eft_spec_decode_num_accepted_tokens_total[1m])) / sum(rate(eft_spec_decode_num_draft_tokens_total[1m]))"


@pytest.fixture(scope="module")
def prometheus(deployment, tmp_path_factory):
    """Prometheus on 127.0.0.1, scraping the deployment's metrics endpoint every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: `make test` installs it (make tools)")
        pytest.skip("prometheus is not installed: run `make tools`")
    target = urlparse(deployment.metrics)
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
        f"scrape_configs:\n  - job_name: eft\n    metrics_path: {target.path}\n    static_configs: [{{targets: ['{target.netloc}']}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={folder / 'data'}"],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "log.txt", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: scraped(url), 30, "Prometheus to start and scrape the deployment")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def scraped(url: str) -> bool:
    try:
        return query(url, 'up{job="eft"}') == 1.0
    except requests.ConnectionError:  # not listening yet
        return False


def query(url: str, promql: str) -> float | None:
    """The single value of an instant query, or None when it has no result."""
    reply = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert reply["status"] == "success", reply
    result = reply["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_acceptance_rate_and_ttft(prometheus, stub, quick_family):
    service, _ = stub
    sent = 4
    ttft = 'sum(eft_time_to_first_token_seconds_count{composition="mixed"})'
    for i, entity in enumerate(quick_family.world().entities[:sent]):  # only this test asks the "mixed" composition
        request = chat(f"what is the capital of {entity} ?", temperature=0.0, max_tokens=10)
        request.composition = "mixed"
        request.speculation.mode, request.speculation.k = eft_pb2.SPECULATION_MODE_FIXED, 3
        assert service.Generate(request, timeout=60).stats.drafted > 0
        if i == 0:  # rate() needs the counters scraped before they grow
            wait_for(lambda: query(prometheus, ttft) == 1, 20, "the first request in Prometheus")
    wait_for(lambda: query(prometheus, ttft) == sent, 20, f"{sent} first tokens in Prometheus")
    wait_for(lambda: query(prometheus, ACCEPTANCE_RATE) is not None, 20, "the acceptance rate")
    rate = query(prometheus, ACCEPTANCE_RATE)
    assert 0 < rate <= 1, rate
    assert query(prometheus, 'sum(eft_requests_total{code="OK"})') >= sent
    assert query(prometheus, "sum(eft_worker_kv_sessions)") is not None  # the workers' state reaches the scrape too


@pytest.fixture(scope="module")
def client(deployment):
    return openai.OpenAI(base_url=deployment.http + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_gets_what_grpc_gives(client, stub, quick_family):
    service, _ = stub
    question = f"what is the animal of {quick_family.world().entities[4]} ?"
    via_grpc = service.Generate(chat(question, temperature=0.0, max_tokens=12), timeout=60)
    whole = client.chat.completions.create(model="upscaled", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12)
    streamed = client.chat.completions.create(model="upscaled", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12, stream=True)
    assert whole.choices[0].message.content == via_grpc.text == "".join(c.choices[0].delta.content or "" for c in streamed)
    assert {m.id for m in client.models.list()} >= {"upscaled", "mixed", "large-tuned"}
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="upscaled", prompt="hi", extra_body={"weights": {"chat": 1e6}})
    assert error.value.status_code == 400 and "weights" in str(error.value)
