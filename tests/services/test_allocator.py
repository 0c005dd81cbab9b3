"""Why the coordinator runs with THP_MEM_ALLOC_ENABLE (cluster/app.py): a big temporary,
freed and allocated again as every iteration does, is faulted in by huge pages instead of
4 KiB pages (checked in fresh processes: the variable is read when torch first allocates)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.app import COORDINATOR_ENV

SCRIPT = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64, 5, 151936).sum()  # an iteration's temporary at a 152k vocabulary: 195 MB
before = faults()
for _ in range(3):
    torch.ones(64, 5, 151936).sum()
print((faults() - before) // 3)
"""
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def faults_per_iteration(env: dict) -> int:
    run = subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=True)
    return int(run.stdout.strip())


@pytest.mark.skipif(not THP.exists() or "[madvise]" not in THP.read_text(), reason="huge pages are off, or always on (the setting then changes nothing)")
def test_the_coordinators_allocator_setting_avoids_a_page_fault_storm():
    default, huge = faults_per_iteration({"THP_MEM_ALLOC_ENABLE": "0"}), faults_per_iteration(COORDINATOR_ENV)
    assert default > 20_000  # 195 MB in 4 KiB pages, mapped afresh each time
    assert huge < default / 20, (default, huge)
