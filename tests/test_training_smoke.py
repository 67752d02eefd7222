"""A tiny model fitted on a few synthetic tasks in mixed batches: the loss must fall."""
import pytest

from routedlora.demo import TASKS, train_demo


@pytest.mark.parametrize("router", ["poly", "mta", "cpoly"])
def test_mixed_task_loss_falls(router):
    hist = train_demo(steps=150, router=router, log_every=150, log=lambda s: None)
    first = sum(hist[t][0] for t in TASKS) / len(TASKS)
    last = sum(hist[t][-1] for t in TASKS) / len(TASKS)
    assert last < first - 0.3, (first, last)
