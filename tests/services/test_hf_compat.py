import torch

from services.hf_compat import cache_kwargs


class NewStyle(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, **kwargs): ...


class OldStyle(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, **kwargs): ...


def test_the_cache_goes_by_the_keyword_the_model_takes():
    cache = object()
    assert cache_kwargs(NewStyle(), cache) == {"cache": cache}
    assert cache_kwargs(OldStyle(), cache) == {"past_key_values": cache}  # an unknown cache= would vanish into **kwargs
