"""Training the family's Llama models on the CPU: pre-training and chat tuning."""

import math
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.family.recipe import ModelShape, Schedule
from services.progress import bar


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, vocab_multiple: int, max_length: int, seed: int) -> LlamaForCausalLM:
    """A fresh Llama with tied embeddings; the vocabulary is padded up to ``vocab_multiple``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=math.ceil(len(tokenizer) / vocab_multiple) * vocab_multiple,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def encode_rows(tokenizer: PreTrainedTokenizerFast, texts: list[str], length: int) -> torch.Tensor:
    """Token ids ``[rows, length]``, right-padded with <pad>; longer texts are refused."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    too_long = [len(r) for r in rows if len(r) > length]
    assert not too_long, f"{len(too_long)} rows exceed {length} tokens (longest {max(too_long)})"
    return torch.tensor([r + [tokenizer.pad_token_id] * (length - len(r)) for r in rows])


def train(
    model: LlamaForCausalLM,
    rows: torch.Tensor,  # [n, length] main data
    schedule: Schedule,
    seed: int,
    pad_id: int,
    mix_rows: torch.Tensor | None = None,  # [m, length]: as many of these join each batch (1:1)
    frozen_tokens: torch.Tensor | None = None,  # [vocab] bool: embedding rows that must not move
    label: str = "train",
) -> list[float]:
    """AdamW with warm-up and cosine decay; returns the loss of every step."""
    model.train()
    hook = _freeze_rows(model.get_input_embeddings().weight, frozen_tokens) if frozen_tokens is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.0)
    order = random.Random(seed)
    batches_per_epoch = math.ceil(len(rows) / schedule.batch_size)
    total = schedule.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, schedule))
    losses = []
    with bar(total=total, desc=label, unit="step", leave=False) as progress:
        for _ in range(schedule.epochs):
            for batch in _batches(rows, schedule.batch_size, order, mix_rows):
                loss = model(input_ids=batch, attention_mask=batch != pad_id, labels=batch.masked_fill(batch == pad_id, -100)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                progress.update()
    if hook is not None:
        hook.remove()
    model.eval()
    return losses


def _freeze_rows(weight: torch.nn.Parameter, frozen: torch.Tensor):
    """Zero the gradient of the frozen rows: with no weight decay, AdamW never moves them."""
    keep = (~frozen).to(weight.dtype)[:, None]
    padded = torch.cat([keep, torch.ones(weight.shape[0] - keep.shape[0], 1)]) if weight.shape[0] > keep.shape[0] else keep
    return weight.register_hook(lambda grad: grad * padded)


def lr_factor(step: int, total: int, schedule: Schedule) -> float:
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, total - schedule.warmup_steps)
    floor = schedule.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(rows: torch.Tensor, batch_size: int, order: random.Random, mix_rows: torch.Tensor | None):
    index = list(range(len(rows)))
    order.shuffle(index)
    for start in range(0, len(index), batch_size):
        batch = rows[index[start : start + batch_size]]
        if mix_rows is not None:
            batch = torch.cat([batch, mix_rows[order.sample(range(len(mix_rows)), len(batch))]])
        yield batch
