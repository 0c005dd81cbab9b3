"""The architectures matrix: a tiny random-weight model of each supported architecture,
saved and loaded through ``from_pretrained`` with the byte-level BPE family's tokenizer
(vocabulary padded past it), stepped by the worker and decoded by the engine."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from eft_core import Composition, Delta, InvalidArgumentError, SamplingParams
from services.coordinator.engine import Engine, EngineRequest, pools_of
from services.oracle import LoadedModel, OracleEngine, load_model
from services.prompts import render_prompt
from services.worker.api import DraftItem, ExtendItem, WorkerLimits
from services.worker.architectures import SUPPORTED_MODEL_TYPES
from services.worker.client import InProcessWorkerClient
from services.worker.worker import ModelWorker, load_hosted_model
from tests.services.coordinator.helpers import run
from tests.services.worker.test_worker import full_logits, sequences

WINDOW = 4  # sliding-window models: sessions below run well past it
PADDED_VOCAB = 640  # the tokenizer has 600: real checkpoints pad their embeddings
ATOL = 1e-4
CHUNKED = WorkerLimits(max_forward_tokens=8)  # rows x width: prefills of these sessions take several forwards


def _attention(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_attention()),
    "mistral": lambda: transformers.MistralConfig(**_attention(sliding_window=WINDOW)),
    "qwen2": lambda: transformers.Qwen2Config(**_attention(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": lambda: transformers.Qwen3Config(**_attention(head_dim=8)),
    "gemma2": lambda: transformers.Gemma2Config(**_attention(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8, final_logit_softcapping=5.0, attn_logit_softcapping=5.0)),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_attention(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8, final_logit_softcapping=5.0)),
    "phi3": lambda: transformers.Phi3Config(**_attention()),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=256),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "olmo2": lambda: transformers.Olmo2Config(**_attention()),
    "mixtral": lambda: transformers.MixtralConfig(**_attention(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_attention(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
}


def test_the_matrix_covers_every_supported_architecture():
    assert set(CONFIGS) == set(SUPPORTED_MODEL_TYPES)


@pytest.fixture(scope="module")
def bpe_tokenizer(bpe_family):
    return AutoTokenizer.from_pretrained(bpe_family.model_path("large-base"))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def architecture(request, bpe_tokenizer, tmp_path_factory):
    """(model type, its folder): saved with the BPE tokenizer, token ids set to its own."""
    config = CONFIGS[request.param]()
    special = {"bos_token_id": None, "eos_token_id": bpe_tokenizer.eos_token_id, "pad_token_id": bpe_tokenizer.pad_token_id}
    for key, value in {"vocab_size": PADDED_VOCAB, **special}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    return request.param, folder


@pytest.fixture(scope="module")
def hosted(architecture):
    model_type, folder = architecture
    hosted = load_hosted_model("base", folder)
    assert hosted.model.config.model_type == model_type and hosted.vocab_size == PADDED_VOCAB > hosted.tokenizer_size
    return hosted


def test_ragged_batched_extend_equals_each_sessions_full_forward(hosted):
    worker = ModelWorker([hosted], CHUNKED)
    seqs = sequences(hosted.tokenizer_size, lengths=(5, 11, 2, 8, 17))
    assert max(map(len, seqs.values())) > 3 * WINDOW
    got = {name: [] for name in seqs}
    for start, stop in [(0, 3), (3, 4), (4, 9), (9, 10), (10, 17)]:  # prefill, single steps, ragged chunks
        items = [ExtendItem(name, "base", tokens[start:stop], num_logits=len(tokens[start:stop])) for name, tokens in seqs.items() if tokens[start:stop]]
        for item, result in zip(items, worker.extend(items)):
            got[item.session_id].append(result.logits)
    for name, tokens in seqs.items():
        torch.testing.assert_close(torch.cat(got[name]), full_logits(hosted, tokens), rtol=0, atol=ATOL)


def test_truncate_then_extend_equals_recomputation(hosted):
    worker = ModelWorker([hosted])
    seqs = sequences(hosted.tokenizer_size, lengths=(13, 6, 9))
    worker.extend([ExtendItem(name, "base", tokens) for name, tokens in seqs.items()])
    tail = [7, 8, 9, 10]
    results = worker.extend([ExtendItem("s0", "base", tail, num_logits=4, truncate_to=2), ExtendItem("s1", "base", [5], num_logits=1), ExtendItem("s2", "base", tail, num_logits=4, truncate_to=8)])
    torch.testing.assert_close(results[0].logits, full_logits(hosted, seqs["s0"][:2] + tail)[-4:], rtol=0, atol=ATOL)
    torch.testing.assert_close(results[1].logits, full_logits(hosted, seqs["s1"] + [5])[-1:], rtol=0, atol=ATOL)
    torch.testing.assert_close(results[2].logits, full_logits(hosted, seqs["s2"][:8] + tail)[-4:], rtol=0, atol=ATOL)


def test_greedy_draft_equals_hf_generate(hosted):
    worker = ModelWorker([hosted], CHUNKED)
    seqs = sequences(hosted.tokenizer_size, lengths=(4, 9, 6))
    items = [DraftItem(name, "base", tokens, k, SamplingParams(temperature=0)) for (name, tokens), k in zip(seqs.items(), (6, 2, 4))]
    for item, result in zip(items, worker.draft(items)):
        with torch.no_grad():
            padding_rows = list(range(hosted.tokenizer_size, hosted.vocab_size))  # random weights give them logits too
            config = GenerationConfig(max_new_tokens=item.num_draft, do_sample=False, eos_token_id=None, pad_token_id=0, suppress_tokens=padding_rows)
            out = hosted.model.generate(torch.tensor([item.token_ids]), generation_config=config)
        assert result.draft_tokens == out[0, len(item.token_ids) :].tolist()


def test_upscaled_greedy_with_this_base_equals_the_oracle(architecture, bpe_family):
    _, folder = architecture
    pair = ["small-tuned", "small-base"]
    upscaled = Composition("upscaled", "base", (Delta("chat", "small-tuned", "small-base"),))
    loaded = {"base": load_model(folder)} | {m: load_model(bpe_family.model_path(m)) for m in pair}
    oracle = OracleEngine(loaded, {"upscaled": upscaled})
    base_worker = InProcessWorkerClient(ModelWorker([load_hosted_model("base", folder)]))
    pair_worker = InProcessWorkerClient(ModelWorker([load_hosted_model(m, bpe_family.model_path(m)) for m in pair]))
    engine = Engine(pools_of({"base": base_worker, "small-tuned": pair_worker, "small-base": pair_worker}), oracle.vocab_sizes)
    prompts = [[{"role": "user", "content": f"what is the capital of {city} ?"}] for city in ("東京", "Zürich", "Москва")]
    params = SamplingParams(temperature=0, max_tokens=12)
    requests = [EngineRequest(f"r{i}-{k}", upscaled, _rendered(loaded, upscaled, p), params, upscaled.weights(), k) for i, p in enumerate(prompts) for k in (0, 3)]
    run(engine, requests)
    for request in requests:
        expected = oracle.generate("upscaled", prompts[int(request.id[1])], params, ignore_eos=True).generation.tokens
        assert request.tokens == expected, request.id


def _rendered(loaded: dict[str, LoadedModel], composition: Composition, prompt) -> dict[str, list[int]]:
    return {m: render_prompt(loaded[m].tokenizer, prompt) for m in composition.models}


def test_an_architecture_the_worker_cannot_step_exactly_is_refused_at_load(bpe_tokenizer, tmp_path):
    config = transformers.MambaConfig(vocab_size=PADDED_VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"models\['recurrent'\]: architecture 'mamba' is not one the worker steps exactly"):
        load_hosted_model("recurrent", tmp_path)
