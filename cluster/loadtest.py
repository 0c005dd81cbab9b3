"""A bounded load test against a running EFTService, checking every token it streams.

``clients`` threads each stream requests one after another (``GenerateStream``) from a list
of cases whose correct output is known from the reference loop (greedy, so exact): every
stream's tokens must equal the case's, no token lost, repeated or cut off, with the final
chunk's finish reason and token count. A request refused with RESOURCE_EXHAUSTED (the
server's queue is full) is timed, then retried after a short pause, as a well-behaved
client does. The run ends when ``duration_s`` has passed or ``requests`` have been started;
requests in flight then finish and are checked too.

Used by the load test in tests/cluster (short) and by ``bench/load.py`` (60 s, 500+ requests,
RSS of every process).
"""

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from eft_core import SamplingParams
from services.pb.eft.v1 import eft_pb2, eft_pb2_grpc

FINISH_REASONS = {"stop": eft_pb2.FINISH_REASON_STOP, "length": eft_pb2.FINISH_REASON_LENGTH}
SPECULATION = {
    "off": eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_OFF),
    "k3": eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_FIXED, k=3),
    "auto": eft_pb2.Speculation(mode=eft_pb2.SPECULATION_MODE_ADAPTIVE, k=2),
}


@dataclass(frozen=True)
class Case:
    """A request and the output the reference loop gives for it."""

    label: str
    request: eft_pb2.GenerateRequest
    expected: tuple[int, ...]
    finish_reason: int  # eft_pb2.FinishReason


@dataclass
class LoadReport:
    duration_s: float = 0.0
    completed: int = 0
    tokens_checked: int = 0
    wrong: list[str] = field(default_factory=list)  # streams whose output differs from the reference
    failed: Counter = field(default_factory=Counter)  # status name -> requests that ended so (RESOURCE_EXHAUSTED excepted)
    refused_after_s: list[float] = field(default_factory=list)  # time to each RESOURCE_EXHAUSTED
    latency_s: list[float] = field(default_factory=list)  # end to end, completed requests
    first_token_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "duration_s": round(self.duration_s, 1),
            "completed": self.completed,
            "tokens_checked": self.tokens_checked,
            "wrong": len(self.wrong),
            "failed": dict(self.failed),
            "refused": len(self.refused_after_s),
            "refused_after_p99_s": _rounded(percentile(self.refused_after_s, 0.99)),
            "latency_p50_s": _rounded(percentile(self.latency_s, 0.5)),
            "latency_p99_s": _rounded(percentile(self.latency_s, 0.99)),
            "ttft_p50_s": _rounded(percentile(self.first_token_s, 0.5)),
            "ttft_p99_s": _rounded(percentile(self.first_token_s, 0.99)),
            "requests_per_s": round(self.completed / self.duration_s, 2) if self.duration_s else 0.0,
        }


def greedy_cases(oracle, questions: list[str], compositions: list[str], max_tokens: int, speculations=("off", "k3", "auto")) -> list[Case]:
    """Every question for every composition and speculation mode, ending at the answer's end
    of sequence or running on to max_tokens (``ignore_eos``), its expected output from the
    oracle's reference loop (greedy: speculation cannot change it)."""
    cases = []
    for composition in compositions:
        for question in questions:
            messages = [{"role": "user", "content": question}]
            for ignore_eos in (False, True):
                reference = oracle.generate(composition, messages, SamplingParams(temperature=0, max_tokens=max_tokens), ignore_eos=ignore_eos).generation
                for mode in speculations:
                    request = eft_pb2.GenerateRequest(
                        composition=composition,
                        messages=eft_pb2.ChatMessages(messages=[eft_pb2.ChatMessage(**m) for m in messages]),
                        sampling=eft_pb2.Sampling(temperature=0.0, max_tokens=max_tokens, seed=len(cases), ignore_eos=ignore_eos),
                        speculation=SPECULATION[mode],
                        return_options=eft_pb2.ReturnOptions(token_ids=True),
                    )
                    label = f"{composition}/{mode}/{'to max_tokens' if ignore_eos else 'to eos'}/{question}"
                    cases.append(Case(label, request, tuple(reference.tokens), FINISH_REASONS[reference.finish_reason]))
    return cases


def run_load(
    channel: grpc.Channel,
    cases: list[Case],
    clients: int,
    duration_s: float | None = None,
    requests: int | None = None,
    timeout_s: float = 120.0,
    retry_pause_s: float = 0.1,
    metadata=(),
) -> LoadReport:
    """Stream ``cases`` from ``clients`` threads until ``duration_s`` or ``requests`` is reached."""
    if duration_s is None and requests is None:
        raise ValueError("run_load needs duration_s or requests (or both)")
    stub, report, lock = eft_pb2_grpc.EFTServiceStub(channel), LoadReport(), threading.Lock()
    started = time.monotonic()
    counter = iter(range(1 << 62))

    def next_case() -> Case | None:
        with lock:
            n = next(counter)
        over_time = duration_s is not None and time.monotonic() - started >= duration_s
        return None if over_time or (requests is not None and n >= requests) else cases[n % len(cases)]

    def client() -> None:
        while (case := next_case()) is not None:
            while not _stream_checked(stub, case, report, lock, timeout_s, metadata):
                time.sleep(retry_pause_s)  # refused: the queue is full

    threads = [threading.Thread(target=client, name=f"load-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.duration_s = time.monotonic() - started
    return report


def _stream_checked(stub, case: Case, report: LoadReport, lock, timeout_s: float, metadata) -> bool:
    """Stream one case and check it; False when refused with RESOURCE_EXHAUSTED (retry)."""
    sent = time.monotonic()
    tokens, chunks, first = [], [], None
    try:
        for chunk in stub.GenerateStream(case.request, timeout=timeout_s, metadata=metadata):
            first = first or time.monotonic()
            tokens += chunk.token_ids
            chunks.append(chunk)
    except grpc.RpcError as error:
        with lock:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not chunks:
                report.refused_after_s.append(time.monotonic() - sent)
                return False
            report.failed[error.code().name] += 1
        return True
    problem = _stream_problem(case, tokens, chunks)
    with lock:
        report.completed += 1
        report.tokens_checked += len(tokens)
        report.latency_s.append(time.monotonic() - sent)
        report.first_token_s.append((first or time.monotonic()) - sent)
        if problem:
            report.wrong.append(f"{case.label}: {problem}")
    return True


def _stream_problem(case: Case, tokens: list[int], chunks: list) -> str | None:
    expected = list(case.expected)
    if tokens != expected:
        if tokens == expected[: len(tokens)]:
            return f"truncated: {len(tokens)} of {len(expected)} tokens"
        if tokens[: len(expected)] == expected:
            return f"{len(tokens) - len(expected)} tokens past the end"
        at = next(i for i, (a, b) in enumerate(zip(tokens + [None], expected + [None])) if a != b)
        return f"differs at token {at}: got {tokens[at:at + 3]}, expected {expected[at:at + 3]}"
    final = [c for c in chunks if c.finish_reason != eft_pb2.FINISH_REASON_UNSPECIFIED]
    if len(final) != 1 or final[0] is not chunks[-1]:
        return f"{len(final)} chunks carry a finish reason (one, the last, should)"
    if final[0].finish_reason != case.finish_reason or final[0].usage.completion_tokens != len(tokens):
        return f"final chunk says {eft_pb2.FinishReason.Name(final[0].finish_reason)} after {final[0].usage.completion_tokens} tokens"
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    """Resident set size of a process on this machine (Linux /proc); "VmHWM": its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"process {pid} has no {field_name}")


def _rounded(value: float) -> float | None:
    return None if value != value else round(value, 3)
