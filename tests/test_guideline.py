"""The guideline state machine against the thesis' own trials (Tables 6.1–6.8): fed each trial's
validation scores in turn, it chooses the action the thesis chose next, in the same order."""

import math

import pytest

from conftest import tiny_config
from segscale.config import apply_override, validate
from segscale.guideline import ACTIONS, Guideline, Scores, Settings, Trial

D, LR, DC, WU, DP = (
    "defaults",
    "decrease_lr",
    "increase_decay_coefficient",
    "increase_warmup",
    ("increase_decay_phase"),
)
LA = Scores(0.8132, 0.9611, 0.8910)  # the one-GPU U-Net baselines of Tables 6.1–6.4 and 6.5–6.8
BRAIN = Scores(0.8901, 0.9447, 0.92)

# (workers, baseline, [(action, (Dice, MA, mIoU) or None)]): the tables' rows, "Model validation"
# last. None: the thesis reports no scores for its default-parameters row.
TABLES = {
    "6.1": (18, LA, [(D, None), (LR, (.7602, .9611, .8893)), (LR, (.7609, .9388, .8662)),
                     (LR, (.8374, .9596, .8796)), ("validate", (.8264, .9537, .8934))]),
    "6.2": (16, LA, [(D, None), (LR, (.7789, .9529, .8737)), (LR, (.6844, .8416, .7688)),
                     (DC, (.8119, .9643, .8994)), ("validate", (.8141, .9647, .8945))]),
    "6.3": (14, LA, [(D, None), (LR, (.8075, .9524, .8858)), (LR, (.8093, .9574, .8941)),
                     (LR, (.7714, .9357, .8585)), (DC, (.8141, .9647, .8945)),
                     ("validate", (.8155, .9722, .8954))]),
    "6.4": (12, LA, [(D, (.8002, .9620, .8909)), (LR, (.7988, .9659, .8922)),
                     (DC, (.8241, .9562, .8925)), ("validate", (.8189, .9565, .8941))]),
    "6.5": (18, BRAIN, [(D, None), (LR, (.8763, .9366, .9093)), (LR, (.8085, .9297, .8803)),
                        (DC, (.8818, .9458, .9158)), (DC, (.8901, .9501, .9249)),
                        ("validate", (.8908, .9521, .9239))]),
    "6.6": (16, BRAIN, [(D, None), (LR, (.8714, .9488, .9191)), (LR, (.6933, .8579, .8145)),
                        (DC, (.8625, .9452, .9137)), (DC, (.6956, .8805, .8014)),
                        (WU, (.8843, .9689, .9327)), (WU, (.8841, .9383, .9166)),
                        (DP, (.8943, .9513, .9252)), ("validate", (.8921, .9631, .9373))]),
    "6.7": (14, BRAIN, [(D, None), (LR, (.8861, .9628, .9313)), (LR, (.8824, .9514, .9249)),
                        (DC, (.8729, .9443, .9193)), (WU, (.8952, .9670, .94)),
                        ("validate", (.8905, .9708, .9374))]),
    "6.8": (12, BRAIN, [(D, (.8824, .9534, .9282)), (LR, (.8625, .9452, .9137)),
                        (DC, (.8897, .9399, .9199)), ("validate", (.8937, .9528, .9236))]),
}  # fmt: skip


@pytest.mark.parametrize("table", list(TABLES))
def test_the_machine_takes_the_thesis_actions_in_order(table):
    workers, baseline, rows = TABLES[table]
    guide = Guideline(baseline, workers)
    decision = guide.start(1e-5)
    trials = []
    for action, scores in rows:
        assert decision.action == action, (table, len(trials), decision.reason)
        trials.append(Trial(action, decision.settings, scores and Scores(*scores)))
        decision = guide.next(trials)
    assert decision.action == "done" and "reached" in decision.reason


def test_each_action_changes_its_setting_by_one_step():
    guide = Guideline(LA, 16)
    base = Settings(lr=1e-3)
    for action, field, want in [
        (LR, "lr", 5e-4),
        (DC, "decay_coefficient", math.log(1000)),
        (WU, "warmup_epochs", 7.0),
        (DP, "decay_phase", 3 / 7 + 1 / 14),
        ("change_optimizer", "optimizer", "adam"),
    ]:
        applied = guide._apply(action, base, "", [Trial(D, base)])
        assert getattr(applied.settings, field) == pytest.approx(want)
    # the settings are a config segscale trains with
    cfg = tiny_config("/store", optimizer={"name": "sgd", "lr": 1.0})
    for item in base.overrides():
        apply_override(cfg, item)
    schedule = validate(cfg).train.schedule
    assert schedule.rule == "grescale" and schedule.decay_phase == pytest.approx(3 / 7)


def worse(d):
    return (d, 0.9, 0.85)


def test_the_cases_the_thesis_never_hit():
    guide = Guideline(LA, 16)
    # the baseline reached at trial 0: validate at once
    decision = guide.next([Trial(D, Settings(1e-5), Scores(0.82, 0.96, 0.89))])
    assert decision.action == "validate"
    # below 12 workers: the defaults, no tuning
    assert Guideline(LA, 8).next([Trial(D, Settings(1e-5), Scores(0.5, 0.5, 0.5))]).action == "done"
    # a diverged trial (NaN) never improves: the next action, from the best trial's settings
    s0 = Settings(1e-3)
    trials = [Trial(D, s0, Scores(*worse(0.70))), Trial(LR, Settings(5e-4), Scores(*worse(0.72)))]
    trials.append(Trial(LR, Settings(2.5e-4), Scores(math.nan, math.nan, math.nan)))
    decision = guide.next(trials)
    assert decision.action == DC and decision.settings.lr == 5e-4  # back to the best: 0.72
    # every action exhausted: stop with the best trial
    trials, dice = [Trial(D, s0, Scores(*worse(0.70)))], 0.70
    decision = guide.next(trials)
    while decision.action in ACTIONS:
        dice -= 0.01  # every trial worse than the one before
        trials.append(Trial(decision.action, decision.settings, Scores(*worse(dice))))
        decision = guide.next(trials)
    assert decision.action == "exhausted" and decision.settings == s0
    assert [t.action for t in trials[1:]] == list(ACTIONS)


def test_scores_rank_dice_then_ma_then_miou():
    assert Scores(0.8, 0.9, 0.1).beats(Scores(0.79, 0.99, 0.99))
    assert Scores(0.8, 0.91, 0.1).beats(Scores(0.8, 0.90, 0.99))
    assert not Scores(0.8, 0.9, 0.5).beats(Scores(0.8, 0.9, 0.5))
    assert Scores.of({"val_dice": 0.5, "val_mean_accuracy": 0.6, "val_mean_iou": 0.7}).ranked == (
        0.5,
        0.6,
        0.7,
    )


def test_change_optimizer_takes_the_first_one_no_trial_used():
    guide = Guideline(LA, 16)
    adam = Settings(1e-3, optimizer="adam")
    # an adam user: sgd is the one left
    assert guide._apply("change_optimizer", adam, "", [Trial(D, adam)]).settings.optimizer == "sgd"
    # both tried: nothing left, whatever the current one
    both = [Trial(D, adam), Trial("change_optimizer", Settings(1e-3))]
    assert guide._apply("change_optimizer", adam, "", both).settings is None


def test_noise_widens_reached_and_raises_the_bar_for_improved():
    s0, s1 = Settings(1e-3), Settings(5e-4)
    trials = [Trial(D, s0, Scores(*worse(0.70))), Trial(LR, s1, Scores(*worse(0.72)))]
    # without noise a 2-point gain is an improvement: repeat decrease_lr
    assert Guideline(LA, 16).next(trials).action == LR
    # with a 3-point run-to-run spread it is not: the next action, from the best trial
    noisy = Guideline(LA, 16, noise=0.03)
    assert noisy.next(trials).action == DC
    # reached: within the spread of the baseline (0.8132), not only within 0.25 points
    assert not Guideline(LA, 16).reached(Scores(*worse(0.79)))
    assert noisy.reached(Scores(*worse(0.79)))
    assert not noisy.reached(Scores(*worse(0.78)))


def test_a_validation_run_that_misses_sends_the_machine_on():
    """The thesis' validation runs always confirmed; when another seed misses, the reach was
    luck: the machine goes on from that trial as if it had missed."""
    guide = Guideline(LA, 16)
    s0 = Settings(1e-3)
    trials = [Trial(D, s0, Scores(0.8120, 0.96, 0.89)), Trial("validate", s0, Scores(*worse(0.79)))]
    decision = guide.next(trials)
    assert decision.action == LR and decision.settings.lr == 5e-4
    assert "validation run missed" in decision.reason
    # a later trial that reaches is validated again, and a confirming validation ends it
    trials.append(Trial(LR, decision.settings, Scores(0.8130, 0.96, 0.89)))
    assert guide.next(trials).action == "validate"
    trials.append(Trial("validate", decision.settings, Scores(0.8125, 0.96, 0.89)))
    done = guide.next(trials)
    assert done.action == "done" and done.settings == decision.settings
