import math

import pytest

from segscale.config import ScheduleConfig
from segscale.schedules import build_schedule, scaled_lr


def test_scaling_rules():
    assert scaled_lr(0.01, 32, 8, "linear") == pytest.approx(0.04)
    assert scaled_lr(0.01, 32, 8, "sqrt") == pytest.approx(0.02)
    assert scaled_lr(0.01, 32, 8, "none") == pytest.approx(0.01)


def test_linear_rule_uses_per_worker_batch_as_default_reference():
    s = build_schedule(
        ScheduleConfig(), 1e-5, batch_size=7, world_size=12, steps_per_epoch=10, epochs=100
    )
    assert s.peak_lr == pytest.approx(12e-5)  # lr × k, as in the thesis
    assert s(0) == s(999) == pytest.approx(12e-5)


def test_gradual_warmup_then_step_decay():
    cfg = ScheduleConfig(warmup_epochs=5, decay="step", decay_epochs=[8, 9], decay_factor=0.5)
    s = build_schedule(cfg, 0.1, batch_size=8, world_size=4, steps_per_epoch=10, epochs=10)
    assert s(0) == pytest.approx(0.1)  # warmup starts at the unscaled lr
    assert s(25) == pytest.approx(0.1 + 0.3 * 0.5)  # halfway to 0.4
    assert s(50) == pytest.approx(0.4)
    assert s(80) == pytest.approx(0.2) and s(95) == pytest.approx(0.1)


def test_cosine_and_poly_reach_their_floor():
    cos = build_schedule(ScheduleConfig(decay="cosine", min_lr_ratio=0.1), 1.0, 8, 1, 10, 10)
    assert (
        cos(0) == pytest.approx(1.0)
        and cos(50) == pytest.approx(0.55)
        and cos(100) == pytest.approx(0.1)
    )
    poly = build_schedule(ScheduleConfig(decay="poly", poly_power=2.0), 1.0, 8, 1, 10, 10)
    assert poly(50) == pytest.approx(0.25) and math.isclose(poly(100), 0.0, abs_tol=1e-12)


def test_constant_warmup():
    s = build_schedule(ScheduleConfig(warmup_epochs=1, warmup="constant"), 0.1, 8, 2, 10, 5)
    assert s(9) == pytest.approx(0.1) and s(10) == pytest.approx(0.2)


def test_warmup_in_steps_and_exponential_decay():
    cfg = ScheduleConfig(warmup_steps=4, decay="exponential", decay_factor=0.5)
    s = build_schedule(cfg, 0.1, batch_size=8, world_size=2, steps_per_epoch=10, epochs=5)
    assert s(2) == pytest.approx(0.15) and s(4) == pytest.approx(0.2)
    assert s(14) == pytest.approx(0.1) and s(24) == pytest.approx(0.05)  # halves every epoch


def test_grescale_phases_and_values():
    """GreScale defaults on 40 epochs of 10 steps, 4 workers: gradual warmup over 5 epochs to
    k·η, stabilisation, then a decay phase of 3/7 of the 35 epochs after the default warmup
    (15 epochs) in which the lr falls 100-fold (decay coefficient ln 100)."""
    import math

    from segscale.config import ScheduleConfig

    s = build_schedule(ScheduleConfig(rule="grescale"), 0.01, 8, 4, 10, 40)
    assert s.peak_lr == pytest.approx(0.04)  # k·η, linear scaling
    assert s.phases() == (50, 250)
    assert s(0) == pytest.approx(0.01) and s(25) == pytest.approx(0.025)  # gradual warmup
    assert s(50) == s(249) == s(250) == pytest.approx(0.04)  # stabilisation, decay from 250
    assert s(325) == pytest.approx(0.004)  # half the decay phase: e^(−ln 100 / 2) = 1/10
    assert s(399) == pytest.approx(0.04 * math.exp(-math.log(100) * 149 / 150))
    longer = build_schedule(ScheduleConfig(rule="grescale", warmup_epochs=7), 0.01, 8, 4, 10, 40)
    assert longer.phases() == (70, 250)  # a longer warmup shortens stabilisation, not decay
    steep = ScheduleConfig(rule="grescale", decay_coefficient=math.log(1000), decay_phase=0.5)
    s = build_schedule(steep, 0.01, 8, 4, 10, 40)
    assert s.phases() == (50, 225) and s(399) == pytest.approx(0.04 * 1000 ** (-174 / 175))


def test_grescale_options_are_refused_where_they_cannot_take_effect():
    from segscale.config import ScheduleConfig
    from segscale.errors import SegscaleError

    with pytest.raises(ValueError, match="decay_coefficient takes effect only with rule: grescale"):
        ScheduleConfig(decay_coefficient=2.0)
    with pytest.raises(ValueError, match="rule: grescale has its own gradual warmup and decay"):
        ScheduleConfig(rule="grescale", decay="cosine")
    with pytest.raises(SegscaleError, match=r"warmup \(30 epochs\) runs into its decay phase"):
        build_schedule(ScheduleConfig(rule="grescale", warmup_epochs=30), 0.01, 8, 1, 10, 40)


def test_grescale_phases_that_overlap_are_refused_before_launch(real_store):
    """A run of at most GreScale's default 5 warmup epochs was refused with advice to shorten
    a decay phase it did not have; a decay phase that is empty went without a word."""
    from conftest import tiny_config
    from segscale.config import validate
    from segscale.engine import plan
    from segscale.errors import SegscaleError

    for epochs, schedule, message in (
        (8, {"warmup_epochs": 7.9}, r"warmup \(7.9 epochs\) runs into its decay phase"),
        (4, {}, r"warmup \(5 epochs, its default\) is longer than the run \(4 epochs\)"),
        (5, {"warmup_epochs": 6}, r"\(6 epochs\) .* set a shorter train.schedule.warmup_epochs"),
        # set in steps: said in steps, and the key that was set named (was: warmup_epochs)
        (
            1,
            {"warmup_steps": 1000},
            r"\(1000 steps\) is longer than the run \(1 epoch, \d+ steps\)",
        ),
        (1, {"warmup_steps": 1000}, r"set a shorter train.schedule.warmup_steps$"),
    ):
        cfg = tiny_config(real_store, epochs=epochs, schedule={"rule": "grescale", **schedule})
        with pytest.raises(SegscaleError, match=message):
            plan(validate(cfg)).check(1)
    cfg = tiny_config(real_store, epochs=3, schedule={"rule": "grescale", "warmup_epochs": 1})
    with pytest.warns(UserWarning, match=r"decay phase is empty: .* the run has 3; the lr stays"):
        plan(validate(cfg)).check(1)
