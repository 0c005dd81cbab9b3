"""The in-process EFT engine: Hugging Face models on one device, each with its own KV
cache, driven by the eft_core reference loop.

It is the oracle the distributed system is tested against and the ``naive`` baseline of
the benchmarks: per token, the models are called one after another, one request at a time.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eft_core import Composition, Generation, NotFoundError, SamplingParams, eft_logprobs, generate
from services.hf_compat import cache_kwargs, full_cache
from services.prompts import Prompt, composition_vocab_sizes, render_prompt, stop_token_ids


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """``from_pretrained`` on a local folder (or a hub id, where a hub is reachable)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(str(path)))


class CachedLogitsSource:
    """An eft_core logits source: one model, its own rendered prompt, and a KV cache that
    follows the calls (extends on a longer prefix, crops back on a shorter one)."""

    def __init__(self, model: torch.nn.Module, prompt_ids: Sequence[int]):
        self.model, self.prompt = model, list(prompt_ids)
        self.cache = full_cache()
        self.cached: list[int] = []  # token ids whose keys and values the cache holds
        self.forward_calls = 0

    @torch.inference_mode()
    def __call__(self, generated: Sequence[int]) -> torch.Tensor:  # [padded vocab]
        ids = self.prompt + list(generated)
        keep = min(_common_prefix(self.cached, ids), len(ids) - 1)  # feed at least one token
        if keep < len(self.cached):
            self.cache.crop(keep - len(self.cached))
        device = self.model.device
        new = torch.tensor([ids[keep:]], device=device)
        positions = torch.arange(keep, len(ids), device=device)[None]
        logits = self.model(input_ids=new, position_ids=positions, use_cache=True, **cache_kwargs(self.model, self.cache)).logits
        self.cached = ids
        self.forward_calls += 1
        return logits[0, -1].float().cpu()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class OracleResult:
    text: str
    generation: Generation
    prompt_ids: dict[str, list[int]]  # per model: its rendered prompt
    step_logits: list[dict[str, torch.Tensor]] | None = None  # per emitted position: model -> logits


class RecordingSource:
    """Wraps a logits source and keeps the logits it returned, by number of generated tokens."""

    def __init__(self, source):
        self.source, self.by_length = source, {}

    def __call__(self, generated: Sequence[int]) -> torch.Tensor:
        logits = self.source(generated)
        self.by_length[len(generated)] = logits
        return logits


class OracleEngine:
    """Compositions of locally loaded models, generated one request at a time."""

    def __init__(self, models: Mapping[str, LoadedModel], compositions: Mapping[str, Composition]):
        self.models, self.compositions = dict(models), dict(compositions)
        for composition in self.compositions.values():
            for name in composition.models:
                if name not in self.models:
                    raise NotFoundError(f"composition {composition.name!r} needs model {name!r}, which is not loaded", field="models")
        self.tokenizers = {n: m.tokenizer for n, m in self.models.items()}
        self.vocab_sizes = composition_vocab_sizes(self.compositions.values(), self.tokenizers)

    def composition(self, name: str) -> Composition:
        if name not in self.compositions:
            raise NotFoundError(f"no composition {name!r} (have {sorted(self.compositions)})", field="composition")
        return self.compositions[name]

    def sources(self, composition: Composition, prompt: Prompt, speculative: bool = False) -> dict[str, CachedLogitsSource]:
        names = composition.models if speculative else composition.scored_models
        return {n: CachedLogitsSource(self.models[n].model, render_prompt(self.models[n].tokenizer, prompt)) for n in names}

    def generate(
        self,
        composition: str,
        prompt: Prompt,
        params: SamplingParams,
        weights: Mapping[str, float] | None = None,
        draft_k: int = 0,
        keep_logits: bool = False,
        ignore_eos: bool = False,
    ) -> OracleResult:
        """One completion; stops at its models' EOS tokens unless ``ignore_eos``. ``keep_logits``:
        return every scored model's logits at each emitted position (speculation off)."""
        chosen = self.composition(composition)
        sources = self.sources(chosen, prompt, speculative=draft_k > 0)
        recorders = {n: RecordingSource(s) for n, s in sources.items()} if keep_logits and not draft_k else None
        if not ignore_eos:
            params = replace(params, stop_token_ids=tuple(dict.fromkeys((*params.stop_token_ids, *stop_token_ids(self.tokenizers, chosen)))))
        generation = generate(recorders or sources, chosen, params, weights=weights, vocab_size=self.vocab_sizes[composition], draft_k=draft_k)
        text = self.tokenizers[chosen.base].decode(generation.tokens, skip_special_tokens=True)
        step_logits = [{n: r.by_length[t] for n, r in recorders.items()} for t in range(len(generation.tokens))] if recorders else None
        return OracleResult(text, generation, {n: s.prompt for n, s in sources.items()}, step_logits)

    @torch.inference_mode()
    def score(self, composition: str, prompt: Prompt, weights: Mapping[str, float] | None = None) -> tuple[list[int], torch.Tensor]:
        """The prompt (as the base renders it) and the EFT log-probabilities at each of its
        positions [positions, vocab]: each scored model's one forward over the whole prompt,
        no cache, combined; row i is the distribution of token i + 1."""
        chosen = self.composition(composition)
        prompts = {n: render_prompt(self.tokenizers[n], prompt) for n in chosen.scored_models}
        logits = {n: self.models[n].model(input_ids=torch.tensor([ids], device=self.models[n].model.device)).logits.float().cpu() for n, ids in prompts.items()}
        weights_row = list(chosen.weights(dict(weights or {})))
        return prompts[chosen.base], eft_logprobs(logits, chosen, weights_row, self.vocab_sizes[composition])[0]

