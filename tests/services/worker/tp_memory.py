"""One rank of a tensor-parallel load, in a fresh process so its peak RSS brackets the load:
``python -m tests.services.worker.tp_memory FOLDER RANK TP PORT`` prints one JSON line with
the peak-RSS rise of loading this rank's shard and the logits of a fixed prompt."""

import json
import sys

import torch

from services.worker.tensor_parallel import init_rank, load_tensor_parallel_model
from tests.services.worker.peak_rss import peak_rss_mib

PROMPT = list(range(3, 40))  # ids below every test model's 320-token vocabulary


def main(folder: str, rank: int, tp: int, port: int) -> dict:
    init_rank(rank, tp, port, "cpu")
    import deepspeed  # noqa: F401  (its import is not the load's memory)

    before = peak_rss_mib()
    hosted = load_tensor_parallel_model("m", folder, tp, torch.float32, "cpu")
    rise = peak_rss_mib() - before
    with torch.inference_mode():
        logits = hosted.model(input_ids=torch.tensor([PROMPT])).logits[0, -3:]
    return {"rank": rank, "peak_rise_mib": round(rise, 1), "logits": logits.tolist()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
