"""Where the worker replicas are: the gateway asks every running replica of each worker
group for its gRPC address (a Ray Serve broadcast) when it starts and then every few
seconds. New replicas (scale-up, or Ray Serve replacing a dead one) join the engine's
placement; replicas Ray Serve no longer runs leave it. A replica that does not answer the
broadcast (frozen, or dying) keeps its place in the list meanwhile: the engine's outlier
ejection keeps it out of placement, and the others' answers still count.

Every LOAD_REPORT_S the directory also asks each known replica how many sessions it holds
(its Info), for every coordinator together, and tells the engine, which places requests by
that load (services/coordinator/load.py): gateways running side by side balance the
workers between them, not each on its own counts.
"""

import asyncio
import logging

from services.coordinator.engine import Engine
from services.worker.client import GrpcWorkerClient, info_or_none

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # how often the replica sets are asked again
ASK_TIMEOUT_S = 10.0  # a replica slower than this to say its address is left out this round
LOAD_REPORT_S = 1.0  # how often each replica is asked for its load (a short Info call)


class WorkerDirectory:
    def __init__(self, engine: Engine, groups: dict[str, list[str]], handles: dict, token: str | None = None):
        """``groups``: each worker group's models; ``handles``: its deployment handle;
        ``token``: the workers' credential."""
        self.engine, self.groups, self.handles, self.token = engine, groups, handles, token
        self.clients: dict[str, dict[str, GrpcWorkerClient]] = {group: {} for group in groups}  # group -> address -> client
        self.seen = dict.fromkeys(groups, 0)  # replicas each group has had: the next one's index
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Wait until every group has a running replica, learn them all, then keep refreshing."""
        for handle in self.handles.values():
            await handle.address.remote()  # returns once one replica of the group is running
        await self.refresh()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._refresh_forever()), loop.create_task(self._report_loads_forever())]

    def labelled_clients(self) -> dict[str, GrpcWorkerClient]:
        """Every known replica's client by its label, ``group/index`` (metrics show no address)."""
        return {client.label: client for clients in self.clients.values() for client in clients.values()}

    def addresses(self) -> dict[str, list[str]]:
        return {group: sorted(clients) for group, clients in self.clients.items()}

    async def refresh(self) -> None:
        for group, handle in self.handles.items():
            addresses = await self._running_addresses(group, handle)
            if addresses is not None and addresses != set(self.clients[group]):
                self._update(group, addresses)

    async def _running_addresses(self, group: str, handle) -> set[str] | None:
        """The addresses the group's running replicas report, plus the known ones while some
        replica is silent; None when Ray Serve could not say."""
        from ray.serve.exceptions import DeploymentUnavailableError

        try:
            answers, silent = await _answers_within(handle.broadcast("address"), ASK_TIMEOUT_S)
        except DeploymentUnavailableError:
            return set()  # no replica running: requests for this group get UNAVAILABLE until one is
        except Exception as error:  # Ray Serve itself did not answer: ask again next round
            log.warning("could not list the replicas of worker group %r: %r", group, error)
            return None
        if silent:
            log.warning("worker group %r: %d replica(s) did not say their address within %.0f s", group, silent, ASK_TIMEOUT_S)
            return set(answers) | set(self.clients[group])
        return set(answers)

    def _update(self, group: str, addresses: set[str]) -> None:
        current = self.clients[group]
        kept = {a: c for a, c in current.items() if a in addresses}
        added = {a: self._client(group, a) for a in sorted(addresses - set(current))}
        self.clients[group] = {**kept, **added}  # a dropped client closes when its last request lets go of it
        self.engine.set_replicas(group, list(self.clients[group].values()))
        log.info("worker group %r: replicas %s (added %s, removed %s)", group, sorted(addresses), sorted(added), sorted(set(current) - addresses))

    def _client(self, group: str, address: str) -> GrpcWorkerClient:
        index, self.seen[group] = self.seen[group], self.seen[group] + 1
        return GrpcWorkerClient(address, token=self.token, label=f"{group}/{index}")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:  # never let the refresher die silently
                log.exception("refreshing the worker directory failed")

    async def report_loads(self) -> None:
        """Each known replica's sessions, as it reports them, to the engine; one that does not
        answer within LOAD_REPORT_S keeps its last report (ejection handles a dead one)."""
        clients = [client for group in self.clients.values() for client in group.values()]
        infos = await asyncio.gather(*(asyncio.to_thread(info_or_none, client, LOAD_REPORT_S) for client in clients))
        for client, info in zip(clients, infos):
            if info is not None:
                self.engine.report_load(client, info.sessions)

    async def _report_loads_forever(self) -> None:
        while True:
            await asyncio.sleep(LOAD_REPORT_S)
            try:
                await self.report_loads()
            except Exception:
                log.exception("reporting the workers' load failed")


async def _answers_within(response, timeout: float) -> tuple[list, int]:
    """The answers of the replicas that answered a broadcast within ``timeout``, and how many
    did not. ``results_async`` fails the whole broadcast when one replica is slow, so a frozen
    replica would hide the others, and its own replacement, until Ray Serve stops it; this
    waits on each replica's result (DeploymentBroadcastResponse's per-replica results, Ray
    2.60), or on all of them at once where that is not available."""
    fetch = getattr(response, "_fetch_replica_results_async", None)
    if fetch is None:
        return await response.results_async(timeout_s=timeout), 0
    replica_results = await asyncio.wait_for(fetch(), timeout)
    calls = [asyncio.ensure_future(result.get_async()) for result in replica_results]
    if not calls:
        return [], 0
    done, pending = await asyncio.wait(calls, timeout=timeout)
    for call in pending:
        call.cancel()
    answers = [call.result() for call in done if call.exception() is None]
    return answers, len(calls) - len(answers)
