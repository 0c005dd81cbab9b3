import torch
from transformers import AutoModelForCausalLM

from services.family.deepen import deepen


def test_a_deepened_model_computes_exactly_the_same_logits(quick_family, tmp_path):
    source = quick_family.model_path("large-base")
    target = deepen(source, tmp_path / "deep", extra_layers=3)
    original, deep = AutoModelForCausalLM.from_pretrained(source), AutoModelForCausalLM.from_pretrained(target)
    assert deep.config.num_hidden_layers == original.config.num_hidden_layers + 3
    ids = torch.tensor([[1, 9, 14, 22, 5, 30, 7, 2], [1, 4, 4, 8, 15, 16, 23, 42]])
    with torch.inference_mode():
        assert torch.equal(original(ids).logits, deep(ids).logits)
        cached_original, cached_deep = original(ids[:, :5], use_cache=True), deep(ids[:, :5], use_cache=True)
        step_original = original(ids[:, 5:], past_key_values=cached_original.past_key_values).logits
        step_deep = deep(ids[:, 5:], past_key_values=cached_deep.past_key_values).logits
    assert torch.equal(step_original, step_deep)
    extra = deep.model.layers[-1]  # it really computes: its hidden projections are not zero
    assert extra.self_attn.q_proj.weight.abs().sum() > 0 and extra.mlp.down_proj.weight.abs().sum() == 0
