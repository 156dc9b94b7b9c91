"""Learning-rate schedules: warmup never swallows a short run."""

from types import SimpleNamespace

from training.optim import effective_warmup, lr_at, warmup_warning


def schedule(name="cosine", warmup=50):
    return SimpleNamespace(name=name, warmup_steps=warmup, min_lr_ratio=0.1, decay_fraction=0.2)


def test_a_warmup_longer_than_half_the_run_is_rescaled_with_a_warning():
    short = schedule(warmup=50)
    assert effective_warmup(short, 500) == 50 and warmup_warning(short, 500) is None
    assert effective_warmup(short, 6) == 1  # a 6-step sweep point: 10 % of the run, at least one step
    assert effective_warmup(short, 60) == 6
    message = warmup_warning(short, 60)
    assert "schedule.warmup_steps=50" in message and "trainer.max_steps=60" in message and "using 6" in message
    # the run now reaches its peak learning rate right after warmup
    assert lr_at(5, 1e-3, 60, short) == 1e-3
    assert max(lr_at(s, 1e-3, 6, short) for s in range(6)) == 1e-3
    assert effective_warmup(schedule(warmup=0), 4) == 0 and warmup_warning(schedule(warmup=0), 4) is None


def test_schedules_keep_their_shape():
    cos = schedule("cosine", 10)
    assert lr_at(0, 1.0, 100, cos) == 0.1 and lr_at(9, 1.0, 100, cos) == 1.0
    assert abs(lr_at(99, 1.0, 100, cos) - 0.1) < 1e-3
    wsd = schedule("wsd", 10)
    assert lr_at(50, 1.0, 100, wsd) == 1.0 and lr_at(99, 1.0, 100, wsd) < 0.2
