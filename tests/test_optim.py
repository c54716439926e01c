"""gpt_trainer/optim.py: the learning-rate schedules (warmup, cosine, linear, wsd, constant)."""
import pytest

from gpt_trainer.errors import ConfigError
from gpt_trainer.optim import get_lr

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 10, 110


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_get_lr_warmup(schedule):
    lrs = [get_lr(it, LR, MIN_LR, WARMUP, DECAY, schedule) for it in range(WARMUP + 1)]
    assert lrs[0] > 0, "the first step must not be wasted with lr 0"
    assert all(a < b for a, b in zip(lrs, lrs[1:])), "warmup must increase"
    assert lrs[WARMUP] == pytest.approx(LR, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_get_lr_decays_to_min_lr(schedule):
    for it in (DECAY, DECAY + 1, DECAY + 1000):
        assert get_lr(it, LR, MIN_LR, WARMUP, DECAY, schedule) == pytest.approx(MIN_LR, rel=1e-12)
    lrs = [get_lr(it, LR, MIN_LR, WARMUP, DECAY, schedule) for it in range(WARMUP, DECAY + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the decay must never go up"
    assert all(MIN_LR - 1e-15 <= lr <= LR + 1e-15 for lr in lrs)
    if schedule in ("cosine", "linear"):
        assert all(a > b for a, b in zip(lrs, lrs[1:])), "cosine/linear decay strictly"
    if schedule == "linear":
        mid = (WARMUP + DECAY) // 2
        assert get_lr(mid, LR, MIN_LR, WARMUP, DECAY, "linear") == pytest.approx((LR + MIN_LR) / 2)
    if schedule == "cosine":
        mid = (WARMUP + DECAY) // 2
        assert get_lr(mid, LR, MIN_LR, WARMUP, DECAY, "cosine") == pytest.approx((LR + MIN_LR) / 2)


def test_get_lr_wsd_stable_then_decay():
    decay_frac = 0.2
    # 100 post-warmup steps: stable for the first 80, decay over the last 20
    decay_start = WARMUP + round((1 - decay_frac) * (DECAY - WARMUP))
    for it in range(WARMUP, decay_start):
        assert get_lr(it, LR, MIN_LR, WARMUP, DECAY, "wsd", decay_frac) == LR, it
    assert get_lr(decay_start, LR, MIN_LR, WARMUP, DECAY, "wsd", decay_frac) == pytest.approx(LR)
    tail = [get_lr(it, LR, MIN_LR, WARMUP, DECAY, "wsd", decay_frac) for it in range(decay_start, DECAY + 1)]
    assert all(a > b for a, b in zip(tail, tail[1:])), "wsd decays strictly in its last phase"
    half = decay_start + (DECAY - decay_start) // 2
    assert get_lr(half, LR, MIN_LR, WARMUP, DECAY, "wsd", decay_frac) == pytest.approx((LR + MIN_LR) / 2)


def test_get_lr_constant():
    for it in range(WARMUP, DECAY + 50):
        assert get_lr(it, LR, MIN_LR, WARMUP, DECAY, "constant") == LR


def test_get_lr_unknown_schedule():
    with pytest.raises(ConfigError, match="lr_schedule"):
        get_lr(WARMUP + 1, LR, MIN_LR, WARMUP, DECAY, "cosin")
