"""DeepSpeed AutoTP over two CPU processes (gloo) gives the logits of one process.

The first run on a machine compiles DeepSpeed's shared-memory op (about a minute, cached in
~/.cache/torch_extensions)."""

import signal

import pytest
import torch

from eft_core import SamplingParams
from services.worker.api import DraftItem, ExtendItem
from services.worker.client import GrpcWorkerClient, InProcessWorkerClient
from services.worker.worker import ModelWorker, load_hosted_model
from services.worker.processes import start_worker, wait_listening

STARTUP_SECONDS = 300


@pytest.fixture(scope="module")
def tp2_address(quick_family):
    process = start_worker("--model", f"large={quick_family.model_path('large-base')}", "--tp", "2", env={"OMP_NUM_THREADS": "1"})
    try:
        yield wait_listening(process, STARTUP_SECONDS), process
    finally:
        if process.poll() is None:
            process.kill()


def test_tp2_logits_equal_tp1(tp2_address, quick_family):
    address, _ = tp2_address
    sharded = GrpcWorkerClient(address, timeout=120)
    single = InProcessWorkerClient(ModelWorker([load_hosted_model("large", quick_family.model_path("large-base"))]))
    assert [m.tensor_parallel_size for m in sharded.info().models] == [2]
    generator = torch.Generator().manual_seed(0)
    prompts = {f"s{i}": torch.randint(3, 50, (n,), generator=generator).tolist() for i, n in enumerate((7, 3, 12))}
    for client in (sharded, single):
        client.results = client.extend([ExtendItem(name, "large", tokens, num_logits=2) for name, tokens in prompts.items()])
        client.results += client.extend([ExtendItem("s0", "large", [5, 6], num_logits=2), ExtendItem("s2", "large", [9])])
        client.truncate("s1", "large", 2)
        client.results += client.extend([ExtendItem("s1", "large", [8, 8, 8], num_logits=3)])
    for got, expected in zip(sharded.results, single.results):
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-4)
        assert got.cache_length == expected.cache_length


def test_tp2_drafts_like_tp1_and_frees_its_sessions(tp2_address, quick_family):
    address, _ = tp2_address
    sharded = GrpcWorkerClient(address, timeout=120)
    single = InProcessWorkerClient(ModelWorker([load_hosted_model("large", quick_family.model_path("large-base"))]))
    items = [DraftItem("d0", "large", [1, 5, 9], 4, SamplingParams(temperature=0)), DraftItem("d1", "large", [1, 7], 2, SamplingParams(temperature=0.8, seed=3))]
    vocab = single.info().models[0].tokenizer_size
    for got, expected in zip(sharded.draft(items), single.draft(items)):
        assert got.draft_tokens == expected.draft_tokens
        positions = list(range(len(got.draft_tokens)))
        torch.testing.assert_close(got.q.rows(positions, vocab), expected.q.rows(positions, vocab), rtol=0, atol=1e-4)
    sharded.release([f"s{i}" for i in range(3)] + ["d0", "d1"])
    assert (sharded.info().sessions, sharded.info().cached_tokens) == (0, 0)


def test_tp2_stops_cleanly(tp2_address):
    _, process = tp2_address
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
