"""Random-weight models of real shapes for the GPU variant of the benchmark: a 1B-class
Llama base and a 100M-class pair (reference, and a "tuned" copy nudged off it), sharing a
32000-token word-level tokenizer, saved in Hugging Face format and loaded back through
``from_pretrained`` like any model. Their outputs mean nothing; their costs are real.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 32000
SHAPES = {
    "large-base": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8, intermediate_size=5632),  # ~1.1B
    "small-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, intermediate_size=2048),  # ~110M
}


def tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build(folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """large-base, small-base and small-tuned under ``folder`` (kept if already there)."""
    folder = Path(folder)
    if all((folder / name / "config.json").is_file() for name in ("large-base", "small-base", "small-tuned")):
        return folder
    words = tokenizer()
    for name, shape in SHAPES.items():
        torch.manual_seed(len(name))
        config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3, **shape)
        model = LlamaForCausalLM(config).to(dtype)
        model.save_pretrained(folder / name)
        words.save_pretrained(folder / name)
        if name == "small-base":  # the "tuned" model: the reference, nudged
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.02 * parameter.std() * torch.randn_like(parameter))
            model.save_pretrained(folder / "small-tuned")
            words.save_pretrained(folder / "small-tuned")
    return folder


def prompts(n: int, length: int = 64, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (length,), generator=generator)) for _ in range(n)]
