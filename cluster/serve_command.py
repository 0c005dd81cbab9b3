"""`eft serve`: deploy on a local Ray cluster, print the endpoint, serve until Ctrl-C."""

import os
import signal
import threading
import time
from pathlib import Path

import grpc

from cluster.config import ServeConfig, demo_config, load_config, load_tokenizers


def serve_until_interrupted(config_path: Path | None, ports: dict[str, int | None], num_cpus: int | None, demo: bool, address: str | None = None) -> int:
    """``ports``: grpc_port, http_port, metrics_port overrides (None: the config's);
    ``address``: a running Ray cluster to attach to (None: start a local one)."""
    config = _config(config_path, ports)
    print("checking the tokenizers: chat templates render, each composition's models share one ...", flush=True)
    load_tokenizers(config)
    where = "a local Ray cluster (127.0.0.1)" if address is None else f"the Ray cluster at {address}"
    print(f"starting {where} and deploying {len(config.worker_groups)} worker groups and the gateway ...", flush=True)
    from cluster.launcher import ray_auth_line, start_local

    started = time.perf_counter()
    try:
        deployment = start_local(config, num_cpus=num_cpus, address=address)
    except ConnectionError as error:
        print(f"error: cannot attach to the Ray cluster at {address!r}: {error} (a cluster with token authentication also needs its token: RAY_AUTH_TOKEN)", flush=True)
        return 1
    names = ", ".join(c.name for c in config.compositions)
    print(f"EFT Serve ready in {time.perf_counter() - started:.0f} s:", flush=True)
    print(f"  gRPC eft.v1.EFTService  {deployment.address}", flush=True)
    print(f"  OpenAI-compatible HTTP  {deployment.http}/v1", flush=True)
    print(f"  Prometheus metrics      {deployment.metrics}", flush=True)
    print(f"  Ray                     {ray_auth_line()}", flush=True)
    print(f"compositions: {names} (default {config.default_composition})", flush=True)
    print(f"try: {eft_command()} generate 'what is the capital of ...' --address {deployment.address} --stream", flush=True)
    if demo and (config.tls or config.auth_token_file):
        print("(no demo request: this config turns on TLS or auth; use eft generate --ca-cert/--token)", flush=True)
    elif demo:
        _demo_request(deployment.address, config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print("serving; Ctrl-C stops", flush=True)
    stop.wait()
    print("stopping ...", flush=True)
    deployment.stop()
    print("stopped", flush=True)
    return 0


def eft_command() -> str:
    """How this shell runs the CLI that is running: ``eft`` where PATH finds this one, else
    its path (after `make run` it lives in .venv/bin, not on PATH)."""
    import shutil
    import sys

    running = Path(sys.argv[0]).resolve()
    if running.name != "eft":
        return f"{Path(sys.executable).name} -m cluster.cli"
    on_path = shutil.which("eft")
    if on_path is not None and Path(on_path).resolve() == running:
        return "eft"
    return os.path.relpath(running) if running.is_relative_to(Path.cwd()) else str(running)


def _config(path: Path | None, ports: dict[str, int | None]) -> ServeConfig:
    if path is not None:
        config = load_config(path)
    else:
        from services.family.build import build_family

        family = build_family()
        config = demo_config(family.path)
    overrides = {name: port for name, port in ports.items() if port is not None}
    return ServeConfig.model_validate({**config.model_dump(), **overrides})


def _demo_request(address: str, config: ServeConfig) -> None:
    from cluster.client import acceptance_line, stream_reply
    from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc

    question = _demo_question(config)
    request = eft_pb2.GenerateRequest(sampling=eft_pb2.Sampling(temperature=0.0, max_tokens=24))
    request.messages.messages.add(role="user", content=question)
    print(f"\ndemo request to {config.default_composition!r}: {question}\n> ", end="", flush=True)
    with grpc.insecure_channel(address) as channel:
        reply = stream_reply(eft_pb2_grpc.EFTServiceStub(channel), request, lambda text: print(text, end="", flush=True))
    print(f"\n{acceptance_line(reply)}\n", flush=True)


def _demo_question(config: ServeConfig) -> str:
    import json

    world = Path(config.models[config.compositions[0].base].path).parent / "world.json"
    if world.is_file():
        entity = json.loads(world.read_text())["entities"][-1]
        return f"what is the capital of {entity} ?"
    return "hello"
