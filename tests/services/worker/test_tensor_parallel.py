"""DeepSpeed AutoTP over two CPU processes (gloo) gives the logits of one process, and each
rank loads only its shard. Nothing is compiled: the CPU ranks all-reduce through gloo
(services/worker/tensor_parallel.py, _without_shm_all_reduce)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

from eft_core import SamplingParams
from services.worker.api import DraftItem, ExtendItem
from services.worker.client import GrpcWorkerClient, InProcessWorkerClient
from services.worker.worker import ModelWorker, load_hosted_model
from services.worker.checkpoint import SafetensorsFiles
from services.worker.processes import start_worker, wait_listening
from services.worker.tensor_parallel import _free_port
from tests.services.worker.tp_memory import PROMPT

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


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, quick_family):
    """A random Llama of 412 MB (float32) in one safetensors file (the case where reading a
    whole file at once would hold the whole model), with the demo family's tokenizer."""
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=8, vocab_size=16000, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("big")
    model.save_pretrained(folder, max_shard_size="2GB")
    transformers.AutoTokenizer.from_pretrained(quick_family.model_path("large-base")).save_pretrained(folder)
    return folder, sum(p.numel() * p.element_size() for p in model.parameters())


def test_each_rank_materialises_only_its_shard_and_the_logits_equal_tp1(big_model):
    folder, model_bytes = big_model
    port, env = _free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.services.worker.tp_memory", str(folder), str(rank), "2", str(port)], stdout=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    results = [json.loads(rank.communicate(timeout=STARTUP_SECONDS)[0].strip().splitlines()[-1]) for rank in ranks]
    with torch.inference_mode():
        expected = transformers.AutoModelForCausalLM.from_pretrained(folder)(input_ids=torch.tensor([PROMPT])).logits[0, -3:]
    bound = (1 / 2 + 0.3) * model_bytes / 2**20
    for result in results:
        print(result["rank"], result["peak_rise_mib"], "MiB of", round(model_bytes / 2**20), "bound", round(bound))
        assert result["peak_rise_mib"] <= bound, result["peak_rise_mib"]
        torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_slices_equal_the_library_s_tensors(tmp_path, dtype):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(7, 5).to(dtype), "b": torch.randn(3).to(dtype), "c": torch.randn(4, 6, 2).to(dtype), "empty": torch.zeros(0, 3).to(dtype)}
    save_file(tensors, tmp_path / "model.safetensors")
    files = SafetensorsFiles.of(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as reference:
        for name in tensors:
            assert torch.equal(files.read(name), reference.get_tensor(name))
    assert torch.equal(files.read("a", 0, 2, 3), tensors["a"][2:5]) and torch.equal(files.read("a", 1, 1, 3), tensors["a"][:, 1:4])
    assert torch.equal(files.read("c", 1, 2, 4), tensors["c"][:, 2:6])
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        files.read("missing")


def _two_ranks(folder) -> list[subprocess.CompletedProcess]:
    port, env = _free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.services.worker.tp_memory", str(folder), str(rank), "2", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    return [(rank, *rank.communicate(timeout=STARTUP_SECONDS)) for rank in ranks]


@pytest.mark.parametrize("model_type, how", [("gemma2", "sharded"), ("mixtral", "whole first"), ("phi3", "refused")])
def test_other_architectures_shard_exactly_or_are_refused_by_name(model_type, how, tmp_path, quick_family):
    """gemma2 (sliding windows, soft-capping) loads shard by shard; mixtral's checkpoint names
    its experts unlike the model, so it loads whole first; AutoTP cannot run phi3's fused
    projections, so the worker refuses it at load."""
    from tests.services.worker.test_architectures import CONFIGS

    tokenizer = transformers.AutoTokenizer.from_pretrained(quick_family.model_path("large-base"))
    config = CONFIGS[model_type]()
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 320, None, tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    results = _two_ranks(tmp_path)
    if how == "refused":
        assert all(rank.returncode != 0 and f"DeepSpeed AutoTP cannot shard '{model_type}' over 2 ranks" in err for rank, _, err in results)
        return
    assert all(("loads the whole model before sharding it" in err) == (how == "whole first") for _, _, err in results)
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([PROMPT])).logits[0, -3:]
    for _, out, _ in results:
        torch.testing.assert_close(torch.tensor(json.loads(out.strip().splitlines()[-1])["logits"]), expected, rtol=0, atol=1e-4)
