"""Peak memory of one Extend call: a long prompt joining 31 one-token rows, on a random
tiny Llama with a large vocabulary (the LM head's output dominates). Run in a fresh process
(``python -m tests.services.worker.prefill_memory MAX_FORWARD_TOKENS``) so the process's
peak RSS before and after the call brackets it; prints one JSON line."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from services.worker.api import ExtendItem, WorkerLimits
from services.worker.worker import HostedModel, ModelWorker
from tests.services.worker.peak_rss import peak_rss_mib

VOCAB, PROMPT, ROWS = 8192, 2048, 32


def main(max_forward_tokens: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4 * PROMPT)
    model = AutoModelForCausalLM.from_config(config).eval()
    worker = ModelWorker([HostedModel("m", model, "random", VOCAB)], WorkerLimits(max_forward_tokens=max_forward_tokens))
    short = [f"s{i}" for i in range(ROWS - 1)]
    worker.extend([ExtendItem(s, "m", [1 + i]) for i, s in enumerate(short)])
    worker.extend([ExtendItem(s, "m", [2]) for s in short] + [ExtendItem("warm", "m", [3] * 64)])  # the allocator's working set
    prompt = torch.randint(3, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    before = peak_rss_mib()
    answers = worker.extend([ExtendItem(s, "m", [5]) for s in short] + [ExtendItem("long", "m", prompt)])
    rise = peak_rss_mib() - before
    with torch.inference_mode():
        expected = model(torch.tensor([prompt])).logits[0, -1]
    error = float((answers[-1].logits[0] - expected).abs().max())
    return {"max_forward_tokens": max_forward_tokens, "peak_rise_mib": round(rise, 1), "long_prompt_logits_max_error": error, "logits_shapes": sorted({tuple(a.logits.shape) for a in answers})}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
