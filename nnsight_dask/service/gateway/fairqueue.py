"""The order in which a deployment's waiting experiments start: light users first, then round robin.

Each user has a first-in-first-out line. :meth:`FairQueue.pop` takes the head of the line of the
user who has the fewest experiments running, then the fewest started from its current line, then
the fewest waiting; among equals, users take turns. So a light user's single experiment starts at the next free slot, however many experiments
heavy users have queued (and however many heavy users there are): with at most
``gateway_max_in_flight`` experiments running on the deployment, it waits for about one batch. A
user at its share of the slots (``gateway_max_in_flight_per_user``) is skipped, so one user alone
never fills the deployment. The price: under sustained overload, the user with the longest backlog
waits longest, by design.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

Item = TypeVar("Item", bound=Hashable)


class FairQueue(Generic[Item]):
    """Waiting items of one deployment, one line per user, taken in turn (not thread-safe: the
    dispatcher holds its lock)."""

    def __init__(self) -> None:
        self._lines: dict[str, deque[Item]] = {}
        #: Users with waiting items, in the order they take their next turn.
        self._turns: deque[str] = deque()
        #: Items each user with waiting items had started since its line was last empty.
        self._started: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def push(self, user: str, item: Item) -> None:
        line = self._lines.get(user)
        if line is None:
            line = self._lines[user] = deque()
            self._turns.append(user)  # a user who had nothing waiting takes the last turn of the round
        line.append(item)

    def pop(self, running: Mapping[str, int] | None = None, cap: int | None = None) -> Item | None:
        """The next item, or None when nothing waits (or every waiting user is at ``cap``).

        ``running``: how many items each user has running. The user with the fewest running goes
        first, then the one that started the fewest since its line was last empty, then the one
        with the fewest waiting, then whose turn comes first: a user with one experiment overtakes
        users who run or queue many, and users with long lines take turns. A user at ``cap`` is
        skipped for now and keeps its turn.
        """
        running = running or {}
        candidates = [u for u in self._turns if cap is None or running.get(u, 0) < cap]
        if not candidates:
            return None
        user = min(candidates, key=lambda u: (running.get(u, 0), self._started.get(u, 0),
                                              len(self._lines[u])))  # min() keeps the first of equals
        self._turns.remove(user)
        line = self._lines[user]
        item = line.popleft()
        if line:
            self._turns.append(user)
            self._started[user] = self._started.get(user, 0) + 1
        else:
            del self._lines[user]
            self._started.pop(user, None)
        return item

    def remove(self, user: str, item: Item) -> bool:
        """Take ``item`` out of the queue (cancelled while waiting); False if it is not waiting."""
        line = self._lines.get(user)
        if line is None or item not in line:
            return False
        line.remove(item)
        if not line:
            del self._lines[user]
            self._started.pop(user, None)
            self._turns.remove(user)
        return True

    def position(self, user: str, item: Item) -> int | None:
        """About how many waiting items start before ``item`` (None if it is not waiting): counted by
        turns only, so lighter users may overtake some of them (see :meth:`pop`).

        Item ``i`` of a user's line starts in round ``i``; before it go ``i`` items of its own line
        and, of every other user's line, the items of rounds up to ``i`` (round ``i`` itself only
        for the users whose turn comes earlier).
        """
        line = self._lines.get(user)
        if line is None or item not in line:
            return None
        rounds = line.index(item)
        ahead = rounds
        earlier = True
        for other in self._turns:
            if other == user:
                earlier = False
                continue
            ahead += min(len(self._lines[other]), rounds + (1 if earlier else 0))
        return ahead
