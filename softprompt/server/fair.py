"""Fair order between clients: the scheduler's waiting jobs, one FIFO per client, taken round-robin.

One client's 256-input classification (or a burst of its generations) no longer goes ahead of a request of
another client that arrived just after it: each client's next job is taken in turn, in the order the clients
first had work waiting, and a client's own jobs keep their arrival order. With one client this is FIFO.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class FairQueue:
    """Jobs (anything with a ``client`` attribute) waiting for their turn; not thread-safe (the scheduler's
    worker thread owns it)."""

    def __init__(self):
        self._by_client: OrderedDict[str, deque] = OrderedDict()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def push(self, job) -> None:
        """Queue ``job`` behind its client's earlier jobs (a client with none joins the end of the round)."""
        self._by_client.setdefault(job.client, deque()).append(job)
        self._n += 1

    def extend(self, jobs) -> None:
        for job in jobs:
            self.push(job)

    def peek(self):
        """The job :meth:`pop` would take (IndexError when empty)."""
        if not self._n:
            raise IndexError("peek at an empty FairQueue")
        return next(iter(self._by_client.values()))[0]

    def pop(self):
        """The next client's oldest job; that client then goes to the end of the round."""
        if not self._n:
            raise IndexError("pop from an empty FairQueue")
        client, jobs = next(iter(self._by_client.items()))
        job = jobs.popleft()
        if jobs:
            self._by_client.move_to_end(client)
        else:
            del self._by_client[client]
        self._n -= 1
        return job
