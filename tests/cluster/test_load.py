"""Sustained load on the local Ray deployment (the short form of bench/load.py): 32 streaming
clients, more than the scheduler runs and queues together, asking greedy questions whose
answers the reference loop gives. Every token is checked; refusals must be prompt."""

from cluster.loadtest import greedy_cases, rss_bytes, run_load
from tests.cluster.helpers import MAX_RUNNING, MAX_WAITING, sessions_held, wait_for

CLIENTS = 32
SECONDS = 15


def test_32_streaming_clients_get_exactly_the_reference_outputs(stub, deployment, oracle, quick_family):
    _, channel = stub
    world = quick_family.world()
    questions = [f"what is the {attribute} of {entity} ?" for entity in world.entities[:6] for attribute in ("capital", "color", "animal")]
    cases = greedy_cases(oracle, questions, ["upscaled"], max_tokens=16)  # "mixed" is the metrics test's own (bench/load.py asks both)
    assert CLIENTS > MAX_RUNNING + MAX_WAITING  # some requests must be refused
    run_load(channel, cases, CLIENTS, duration_s=3)  # warm up: batch shapes, thread pools
    pids = [pid for deployment_pids in deployment.process_ids().values() for pid in deployment_pids]
    before = {pid: rss_bytes(pid) for pid in pids}
    report = run_load(channel, cases, CLIENTS, duration_s=SECONDS)
    growth = {pid: rss_bytes(pid) / before[pid] - 1 for pid in pids}
    summary = report.summary()
    print(f"load: {summary}; RSS growth per process: {', '.join(f'{g:+.1%}' for g in growth.values())} ({len(pids)} processes)")
    assert report.wrong == [] and not report.failed, (report.wrong[:5], report.failed)
    assert report.completed >= 50 and report.tokens_checked >= 300, summary
    assert report.refused_after_s and max(report.refused_after_s) < 1.0, summary  # over the queue limit: refused at once
    assert max(growth.values()) < 0.10, growth
    wait_for(lambda: sessions_held(deployment) == 0, 5, "every session released")
