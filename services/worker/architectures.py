"""The model architectures a worker serves: each is proven exact by the matrix in
tests/services/worker/test_architectures.py (a tiny random-weight model of each: a ragged
batched Extend over sessions of different lengths equals each session's full forward,
truncate + extend equals recomputation, greedy Draft equals HF ``generate``, and an
up-scaled composition with it as the base gives the oracle's greedy tokens; sliding-window
models with sessions longer than their window).

Anything else is refused at load, naming it: the worker's batching (services/worker/slots.py:
a cache object whose ``update`` writes in place, attention through transformers'
AttentionInterface under the worker's own mask, explicit position ids, every layer's keys
and values kept) is exact only for decoder-only attention models whose forward honours all
of those. A recurrent or hybrid
model (Mamba, Jamba), an encoder-decoder, or one with its own cache type would be served
wrong, and a model served wrong is worse than one refused.
"""

from eft_core import InvalidArgumentError

SUPPORTED_MODEL_TYPES = {  # config.model_type -> what it covers
    "llama": "Llama 2 and 3, and the models built on them",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2, Qwen2.5 (sliding-window layers optional)",
    "qwen3": "Qwen3 (q/k norms)",
    "gemma2": "Gemma 2 (alternating sliding-window layers, logit soft-capping)",
    "gemma3_text": "Gemma 3 text models (sliding-window layers, logit soft-capping)",
    "phi3": "Phi-3, Phi-4",
    "gpt_neox": "GPT-NeoX, Pythia (partial rotary embeddings)",
    "gpt2": "GPT-2 (learned absolute positions)",
    "olmo2": "OLMo 2",
    "mixtral": "Mixtral (mixture of experts)",
    "qwen2_moe": "Qwen2-MoE, Qwen1.5-MoE (mixture of experts, shared expert)",
}


def check_supported(name: str, model_type: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgumentError(
            f"architecture {model_type!r} is not one the worker steps exactly (supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); "
            "refused rather than served wrong",
            field=f"models[{name!r}]",
        )
