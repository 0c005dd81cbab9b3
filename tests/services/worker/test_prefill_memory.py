"""A 2048-token prompt joining 31 decoding rows of a 8192-token vocabulary: the call's peak
memory stays bounded by the forward budget and the kept positions, not by rows x prompt x
vocabulary (the logits of every position were 2.1 GiB alone; the measured rise was 2181 MiB)."""

import json
import subprocess
import sys

from services.worker.api import WorkerLimits

BOUND_MIB = 400  # measured 200 MiB at the default budget: the padded batch cache (32 rows x 2048 columns) and one chunk's activations


def test_a_long_prompt_among_decoding_rows_keeps_the_call_within_its_memory_bound():
    run = subprocess.run([sys.executable, "-m", "tests.services.worker.prefill_memory", str(WorkerLimits.max_forward_tokens)], capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    print(measured)
    assert measured["logits_shapes"] == [[1, 8192]]  # one position per row came back
    assert measured["long_prompt_logits_max_error"] < 1e-5  # chunked prefill equals one forward
    assert measured["peak_rise_mib"] < BOUND_MIB, measured
