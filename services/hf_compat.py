"""Differences between transformers 5.x releases, and between model classes, that the
serving code meets.

The keyword a model's forward takes its KV cache by: ``cache`` since about 5.20, where
``past_key_values`` is deprecated; ``past_key_values`` before, where an unknown ``cache=``
was silently swallowed by ``**kwargs`` (the model then built a cache of its own and ours
stayed empty: found on a GPU machine with transformers 5.17).
"""

import functools
import inspect

from transformers import DynamicCache


@functools.cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for this model's forward."""
    return {_cache_keyword(type(model)): cache}


def full_cache() -> DynamicCache:
    """A KV cache whose every layer keeps every token. ``DynamicCache(config=...)`` gives
    sliding-window layers (Mistral, Gemma 2/3, Qwen2) a cache that drops what leaves the
    window, so a session's columns could not be taken back out of a batch, nor truncated;
    here the model's sliding-window masks hide those tokens instead (same logits, more memory)."""
    return DynamicCache()
