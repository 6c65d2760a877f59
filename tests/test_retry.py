"""The retry rules after a lost shard worker (client/retry.py), without a cluster."""
from __future__ import annotations

from nnsight_dask.client.retry import FREE_RETRIES, STALE_RECORD_RESUBMITS, Retries


def test_the_culprit_is_retried_once_alone_then_fails():
    retries = Retries()
    first = retries.after_loss("tcp://w1", moved=True, shards_dead=True)
    assert (first.action, first.solo) == ("retry", True) and "worker tcp://w1 died while" in first.reason
    second = retries.after_loss("tcp://w2", moved=True, shards_dead=True)
    assert second.action == "fail" and "and again during its retry" in second.reason


def test_nobody_can_tell_counts_as_the_culprit():
    retries = Retries()
    assert retries.after_loss(None, moved=False, shards_dead=False).action == "retry"
    assert retries.after_loss(None, moved=False, shards_dead=False).action == "fail"


def test_a_bystander_is_retried_without_counting_up_to_a_bound():
    retries = Retries()
    for _ in range(FREE_RETRIES):
        decision = retries.after_loss("", moved=False, shards_dead=False)
        assert (decision.action, decision.solo) == ("retry", False) and "not counted" in decision.reason
    # its own loss still gets its one counted retry after being a bystander
    assert Retries(free=3).after_loss("tcp://w", moved=False, shards_dead=False).action == "retry"
    assert retries.after_loss("", moved=False, shards_dead=False).action == "fail"


def test_a_stale_record_is_resubmitted_a_few_times_only_while_nothing_is_dead():
    retries = Retries()
    for _ in range(STALE_RECORD_RESUBMITS):
        assert retries.after_loss("", moved=True, shards_dead=False).action == "resubmit"
    assert retries.after_loss("", moved=True, shards_dead=False).action == "retry"  # then a bystander's retry
    assert Retries().after_loss("", moved=True, shards_dead=True).action == "retry"  # dead shards: recover first
    assert Retries().after_loss("tcp://w", moved=True, shards_dead=False).action == "retry"  # it was computing there
