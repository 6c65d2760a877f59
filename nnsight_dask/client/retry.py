"""What an experiment does after it lost a shard's worker: resubmit, retry, or fail.

Pure (no Dask): :meth:`Retries.after_loss` is told what the client found out and answers with a
:class:`Decision`; ``client/experiment.py`` acts on it. The rules:

- **Stale record.** The shards had moved since the client cached the deployment's placement, and
  no worker died under the experiment: resubmit to the new placement, without counting, at most
  :data:`STALE_RECORD_RESUBMITS` times.
- **Culprit.** A worker died while the experiment computed on it (or nobody can tell, with no
  monitor): retry once, alone (``solo``: so that if it kills the worker again, no other experiment
  dies with it); a second such loss fails it: it may be what kills the worker.
- **Bystander.** It was only waiting (queued, or on another shard): retry without counting, at most
  :data:`FREE_RETRIES` times.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Re-submissions allowed when only the client's cached deployment record was out of date.
STALE_RECORD_RESUBMITS = 3
#: Retries after losses an experiment did not cause (it was waiting, not computing on the worker).
FREE_RETRIES = 5


@dataclass(frozen=True)
class Decision:
    """``action`` is ``"resubmit"`` (same attempt, new placement), ``"retry"`` (a new attempt that
    names the old one) or ``"fail"``; ``reason`` says why (shown on the Experiments page, or the error)."""

    action: str
    reason: str
    #: The retry leaves on a route of its own.
    solo: bool = False


@dataclass
class Retries:
    """An experiment's count of losses, across its attempts."""

    counted: int = 0
    free: int = 0
    resubmits: int = 0

    def after_loss(self, lost_on: str | None, moved: bool, shards_dead: bool) -> Decision:
        """Decide after a loss. ``lost_on``: the worker that died while this experiment computed on
        it, ``""`` if it was only waiting, ``None`` if nobody can tell; ``moved``: the deployment's
        placement differs from the one the experiment was sent to; ``shards_dead``: the current
        placement still has shards on dead workers (then it must be recovered, not resubmitted)."""
        if moved and not lost_on and not shards_dead and self.resubmits < STALE_RECORD_RESUBMITS:
            self.resubmits += 1
            return Decision("resubmit", "the deployment's shards had moved (cached placement was out of date)")
        if lost_on is None or lost_on:
            where = f"worker {lost_on}" if lost_on else "a shard's worker"
            if self.counted >= 1:
                return Decision("fail", f"{where} died while this experiment was running on it, and again during "
                                        "its retry; the experiment may be what kills the worker (e.g. it allocates "
                                        "more memory than the worker has)")
            self.counted += 1
            return Decision("retry", f"{where} died while this experiment was running on it", solo=True)
        self.free += 1
        if self.free > FREE_RETRIES:
            return Decision("fail", f"the deployment lost a shard's worker {self.free} times while this experiment waited")
        return Decision("retry", "a shard's worker died while this experiment waited (queued, or on another shard); "
                                 "not counted against its retry")
