"""Starting worker processes in tests, without ever blocking on a pipe."""

import os
import selectors
import subprocess
import sys
import time

LISTENING = "model worker listening on "


def start_worker(*args: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "services.worker.server", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def wait_listening(process: subprocess.Popen, timeout: float) -> str:
    """The address the worker printed; raises with its output if it died or took too long."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = process.stdout.readline()
        if not line:  # the process ended
            break
        seen.append(line)
        if line.startswith(LISTENING):
            return line.split()[-1]
    process.kill()
    raise RuntimeError(f"worker did not start within {timeout} s (exit {process.poll()}):\n{''.join(seen)[-4000:]}")
