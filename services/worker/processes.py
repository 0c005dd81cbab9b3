"""Starting model worker processes (tests, benchmarks) without ever blocking on a pipe: a
thread drains each worker's output for as long as it runs, keeping the last lines."""

import collections
import os
import queue
import subprocess
import sys
import threading

LISTENING = "model worker listening on "


def start_worker(*args: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "services.worker.server", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    process.lines = queue.Queue()  # what the drain thread read, for wait_listening
    process.tail = collections.deque(maxlen=200)
    threading.Thread(target=_drain, args=(process,), name=f"worker-{process.pid}-output", daemon=True).start()
    return process


def _drain(process: subprocess.Popen) -> None:
    for line in process.stdout:
        process.tail.append(line)
        process.lines.put(line)
    process.lines.put(None)  # the process closed its output


def wait_listening(process: subprocess.Popen, timeout: float) -> str:
    """The address the worker printed; raises with its output if it died or took too long."""
    import time

    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = process.lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        if line.startswith(LISTENING):
            return line.split()[-1]
    process.kill()
    raise RuntimeError(f"worker did not start within {timeout} s (exit {process.poll()}):\n{''.join(process.tail)[-4000:]}")


def finished_output(process: subprocess.Popen, timeout: float) -> str:
    """Wait for the process to end; its last output lines."""
    process.wait(timeout=timeout)
    while process.lines.get(timeout=timeout) is not None:  # until the drain thread saw the end
        pass
    return "".join(process.tail)
