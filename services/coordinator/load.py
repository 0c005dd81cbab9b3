"""How loaded each worker replica is, as placement sees it. Several coordinators place
requests on the same replicas, so a coordinator's own counts are not the load: each replica
reports the sessions it holds (everyone's), and between reports a coordinator moves that
figure by its own placements and releases, which it knows at once."""

import threading
from collections import defaultdict
from collections.abc import Iterable


class ReplicaLoad:
    """Sessions per replica (a replica is whatever key the engine uses for it)."""

    def __init__(self):
        self.lock = threading.Lock()  # placement runs in the scheduler's thread, reports in the directory's
        self.mine: dict[object, int] = defaultdict(int)  # sessions this coordinator's requests hold there
        self.reported: dict[object, tuple[int, int]] = {}  # the replica's last report, and `mine` when it came

    def placed(self, replica, sessions: int) -> None:
        with self.lock:
            self.mine[replica] += sessions

    def released(self, replica, sessions: int) -> None:
        with self.lock:
            self.mine[replica] -= sessions
            if self.mine[replica] <= 0:
                del self.mine[replica]

    def report(self, replica, sessions: int) -> None:
        """The replica says it holds ``sessions`` now, every coordinator's together."""
        with self.lock:
            self.reported[replica] = (sessions, self.mine.get(replica, 0))

    def of(self, replica) -> int:
        """The replica's sessions now: its last report, moved by this coordinator's changes
        since; never fewer than this coordinator's own (a report older than its placements)."""
        with self.lock:
            mine = self.mine.get(replica, 0)
            if replica not in self.reported:
                return mine
            reported, mine_then = self.reported[replica]
            return max(mine, reported + mine - mine_then)

    def holds_mine(self, replica) -> bool:
        return self.mine.get(replica, 0) > 0

    def forget(self, replicas: Iterable) -> None:
        with self.lock:
            for replica in replicas:
                self.reported.pop(replica, None)
