"""Where the worker replicas are: the gateway asks every running replica of each worker
group for its gRPC address (a Ray Serve broadcast) when it starts and then every few
seconds. New replicas (scale-up, or Ray Serve replacing a dead one) join the engine's
placement; replicas that stopped answering leave it, and the requests placed on them fail
with UNAVAILABLE at their next call.
"""

import asyncio
import logging

from services.coordinator.engine import Engine
from services.worker.client import GrpcWorkerClient

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # how often the replica sets are asked again
ASK_TIMEOUT_S = 10.0  # a replica slower than this to say its address is left out this round


class WorkerDirectory:
    def __init__(self, engine: Engine, groups: dict[str, list[str]], handles: dict):
        """``groups``: each worker group's models; ``handles``: its deployment handle."""
        self.engine, self.groups, self.handles = engine, groups, handles
        self.clients: dict[str, dict[str, GrpcWorkerClient]] = {group: {} for group in groups}  # group -> address -> client
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        """Wait until every group has a running replica, learn them all, then keep refreshing."""
        for handle in self.handles.values():
            await handle.address.remote()  # returns once one replica of the group is running
        await self.refresh()
        self.task = asyncio.get_running_loop().create_task(self._refresh_forever())

    def labelled_clients(self) -> dict[str, GrpcWorkerClient]:
        """Every known replica's client, labelled ``group@address`` (for metrics)."""
        return {f"{group}@{address}": client for group, clients in self.clients.items() for address, client in clients.items()}

    def addresses(self) -> dict[str, list[str]]:
        return {group: sorted(clients) for group, clients in self.clients.items()}

    async def refresh(self) -> None:
        for group, handle in self.handles.items():
            addresses = await self._running_addresses(group, handle)
            if addresses is not None and addresses != set(self.clients[group]):
                self._update(group, addresses)

    async def _running_addresses(self, group: str, handle) -> set[str] | None:
        """The addresses the group's running replicas report; None when Ray Serve could not say."""
        from ray.serve.exceptions import DeploymentUnavailableError

        try:
            return set(await asyncio.wait_for(handle.broadcast("address").results_async(), ASK_TIMEOUT_S))
        except DeploymentUnavailableError:
            return set()  # no replica running: requests for this group get UNAVAILABLE until one is
        except Exception as error:  # a replica died mid-broadcast, or a slow one: ask again next round
            log.warning("could not list the replicas of worker group %r: %r", group, error)
            return None

    def _update(self, group: str, addresses: set[str]) -> None:
        current = self.clients[group]
        kept = {a: c for a, c in current.items() if a in addresses}
        added = {a: GrpcWorkerClient(a) for a in addresses - set(current)}
        self.clients[group] = {**kept, **added}  # a dropped client closes when its last request lets go of it
        self.engine.set_replicas(self.groups[group], list(self.clients[group].values()))
        log.info("worker group %r: replicas %s (added %s, removed %s)", group, sorted(addresses), sorted(added), sorted(set(current) - addresses))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:  # never let the refresher die silently
                log.exception("refreshing the worker directory failed")
