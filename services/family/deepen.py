"""A cost-scaled copy of a Llama model: extra decoder layers whose output projections
(attention ``o_proj`` and MLP ``down_proj``) are zero, so each adds exactly nothing to the
residual stream. The model computes the same function with more work per token: on a CPU,
where tiny models cost about the same per token whatever their width (framework overhead),
it stands in for a base that is many times slower than its drafter, as a 70B base is next
to a 7B drafter on GPUs.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def deepen(source: str | Path, target: str | Path, extra_layers: int, seed: int = 0) -> Path:
    """Save ``source`` with ``extra_layers`` more (zero-output) layers at ``target``."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layers = model.model.layers
    layer_class = type(layers[0])
    config = model.config
    torch.manual_seed(seed)
    for _ in range(extra_layers):
        layer = layer_class(config, layer_idx=len(layers))
        with torch.no_grad():
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        layers.append(layer)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[0]] * len(layers)
    target = Path(target)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target
