"""What only a GPU shows, checked in a few minutes: the model worker places a real-shaped
model on CUDA, its batched KV-cached Extend equals one full forward there, its greedy Draft
equals Hugging Face's greedy generate, and the coordinator's decide phase on CUDA gives the
CPU's greedy tokens (with both times per iteration). Prints a JSON line per check; exits 1
on a failure.

    python bench/gpu_check.py [--folder DIR]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from real_shapes import build  # beside this script
from services.worker.api import DraftItem, ExtendItem
from services.worker.worker import ModelWorker, load_hosted_model
from eft_core import SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path.home() / ".cache" / "eft-serve" / "bench-real-shapes")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = build(args.folder)
    hosted = load_hosted_model("small", folder / "small-base", torch.float32, "cuda:0")
    worker = ModelWorker([hosted])
    ok = True

    def report(name: str, passed: bool, **figures) -> None:
        nonlocal ok
        ok &= passed
        print(json.dumps({"check": name, "passed": passed, **figures}), flush=True)

    params = next(hosted.model.parameters())
    report("placement", params.device.type == "cuda", device=str(params.device), gpu=torch.cuda.get_device_name(0), allocated_mib=torch.cuda.memory_allocated() // 2**20)
    generator = torch.Generator().manual_seed(0)
    sequences = {f"s{i}": torch.randint(4, 32000, (n,), generator=generator).tolist() for i, n in enumerate((37, 5, 120, 64))}
    worker.extend([ExtendItem(s, "small", t[: len(t) // 2]) for s, t in sequences.items()])
    pieces = worker.extend([ExtendItem(s, "small", t[len(t) // 2 :], num_logits=len(t) - len(t) // 2) for s, t in sequences.items()])
    worst = 0.0
    with torch.inference_mode():
        for (session, tokens), piece in zip(sequences.items(), pieces):
            full = hosted.model(torch.tensor([tokens], device="cuda:0")).logits[0, len(tokens) // 2 :].float().cpu()
            worst = max(worst, (full[:, : piece.logits.shape[-1]] - piece.logits.float()).abs().max().item())
    report("ragged batched extend = full forward (float32, cuda)", worst < 1e-3, max_abs_diff=worst)
    prompt = sequences["s0"]
    drafted = worker.draft([DraftItem("g", "small", prompt, 8, SamplingParams(temperature=0))])[0].draft_tokens
    with torch.inference_mode():
        reference = hosted.model.generate(torch.tensor([prompt], device="cuda:0"), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=3)[0, len(prompt) :].tolist()
    report("greedy draft = HF greedy generate (cuda)", drafted == reference, drafted=drafted, reference=reference)
    check_decide_on_cuda(report)
    return 0 if ok else 1


def check_decide_on_cuda(report) -> None:
    """The coordinator's decide phase with ``device="cuda"`` (bench/decide.py's cells, real
    shapes): the same greedy tokens as on the CPU, and its time per iteration beside the CPU's."""
    from decide import COMPOSITIONS, measure  # beside this script

    torch.set_num_threads(1)  # as the gateway replica runs
    for mode in ("greedy", "sampled", "spec_greedy", "spec_sampled"):
        for batch in (8, 64):
            cells, tokens = {}, {}
            for device in ("cpu", "cuda"):
                tokens[device] = []
                cells[device] = measure(COMPOSITIONS["upscaled"], 151936, batch, mode, 3, torch.bfloat16, device, tokens[device])
            same = tokens["cpu"] == tokens["cuda"] if mode.endswith("greedy") else None
            report(f"decide on cuda, upscaled V=151936 B={batch} {mode}", same is not False, same_tokens=same, cpu_ms=round(cells["cpu"]["step_ms"], 1), cuda_ms=round(cells["cuda"]["step_ms"], 1), floor_ms=round(cells["cpu"]["floor_ms"], 2))


if __name__ == "__main__":
    sys.exit(main())
