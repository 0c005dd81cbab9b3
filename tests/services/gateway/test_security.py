"""TLS and the bearer token on the public gRPC and HTTP ports, with a test CA made here."""

import subprocess

import grpc
import httpx2 as httpx  # the openai client's HTTP library
import openai
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.coordinator.engine import Engine, pools_of
from services.coordinator.scheduler import Scheduler
from services.family.compositions import family_compositions
from services.gateway.gateway import Gateway, Limits
from services.gateway.openai_api import create_app, start_http_server
from services.gateway.server import create_server
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc
from services.security import Security
from services.worker.client import model_contexts
from tests.services.coordinator.helpers import start_workers

TOKEN = "s3cret-token"


def make_ca_and_server_cert(folder) -> dict[str, str]:
    """A CA, and a certificate it signed for 127.0.0.1 (openssl)."""
    files = {name: str(folder / f"{name}.pem") for name in ("ca", "ca-key", "cert", "key")}
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", files["ca-key"], "-out", files["ca"], "-days", "2", "-subj", "/CN=eft-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", files["key"], "-out", str(folder / "server.csr"), "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(folder / "server.csr"), "-CA", files["ca"], "-CAkey", files["ca-key"], "-CAcreateserial", "-out", files["cert"], "-days", "2", "-extfile", str(folder / "san.ext"))
    return files


@pytest.fixture(scope="module")
def secured(quick_family, oracle, tokenizers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    files = make_ca_and_server_cert(folder)
    (folder / "token").write_text(TOKEN + "\n")
    security = Security.from_files(files["cert"], files["key"], str(folder / "token"))
    placement, _, stop_workers = start_workers(quick_family, "grpc")
    scheduler = Scheduler(Engine(pools_of(placement), oracle.vocab_sizes))
    gateway = Gateway(family_compositions(), tokenizers, model_contexts(placement.values()), scheduler, "upscaled", Limits(max_tokens=16))
    grpc_server, grpc_port = create_server(gateway, "127.0.0.1:0", security)
    http, http_port = start_http_server(create_app(gateway, security), "127.0.0.1", 0, (files["cert"], files["key"]))
    yield {"grpc": f"127.0.0.1:{grpc_port}", "http": f"https://127.0.0.1:{http_port}", "ca": files["ca"]}
    http.should_exit = True
    grpc_server.stop(grace=None)
    scheduler.close()
    stop_workers()


def tls_channel(secured):
    with open(secured["ca"], "rb") as ca:
        return grpc.secure_channel(secured["grpc"], grpc.ssl_channel_credentials(root_certificates=ca.read()))


def request() -> eft_pb2.GenerateRequest:
    return eft_pb2.GenerateRequest(text="the capital of", sampling=eft_pb2.Sampling(temperature=0, max_tokens=4))


@pytest.mark.parametrize("metadata, allowed", [(None, False), ((("authorization", "Bearer wrong"),), False), ((("authorization", "Basic " + TOKEN),), False), ((("authorization", f"Bearer {TOKEN}"),), True)])
def test_grpc_needs_the_bearer_token(secured, metadata, allowed):
    with tls_channel(secured) as channel:
        stub = eft_pb2_grpc.EFTServiceStub(channel)
        for call in (lambda: stub.Generate(request(), metadata=metadata, timeout=30), lambda: list(stub.GenerateStream(request(), metadata=metadata, timeout=30))):
            if allowed:
                assert call()
            else:
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in error.value.details()


def test_health_answers_without_a_token(secured):
    with tls_channel(secured) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="eft.v1.EFTService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_against_tls_fails_cleanly(secured):
    with grpc.insecure_channel(secured["grpc"]) as channel:
        with pytest.raises(grpc.RpcError) as error:
            eft_pb2_grpc.EFTServiceStub(channel).Generate(request(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(requests.ConnectionError):
        requests.get(secured["http"].replace("https", "http") + "/v1/models", timeout=10)


def test_http_needs_the_token_and_the_openai_client_sends_it(secured):
    with httpx.Client(verify=secured["ca"]) as http:
        for header, message in [({}, "missing bearer token"), ({"authorization": "Bearer nope"}, "invalid bearer token")]:
            reply = http.get(secured["http"] + "/v1/models", headers=header)
            assert reply.status_code == 401 and message in reply.json()["error"]["message"]
        assert http.get(secured["http"] + "/health").status_code == 200
        assert http.get(secured["http"] + "/metrics").status_code == 401  # open on the scrape port only
        assert http.get(secured["http"] + "/metrics", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        client = openai.OpenAI(base_url=secured["http"] + "/v1", api_key=TOKEN, http_client=http, max_retries=0)
        reply = client.completions.create(model="upscaled", prompt="the capital of", temperature=0, max_tokens=4)
        assert reply.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=secured["http"] + "/v1", api_key="wrong", http_client=http, max_retries=0).models.list()


def test_unreadable_files_fail_at_start_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="tls.cert_file: cannot read"):
        Security.from_files(str(tmp_path / "missing.pem"), str(tmp_path / "key.pem"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        Security.from_files(token_file=str(tmp_path / "empty"))


def test_the_eft_cli_connects_with_ca_and_token(secured):
    import sys
    from pathlib import Path

    eft = str(Path(sys.executable).parent / "eft")
    base = [eft, "compositions", "--address", secured["grpc"], "--ca-cert", secured["ca"]]
    good = subprocess.run([*base, "--token", TOKEN], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "upscaled" in good.stdout, good.stderr
    bad = subprocess.run(base, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr and "Traceback" not in bad.stderr
