"""objective.kind / variant and the lr-schedule fields: defaults, and bad values fail naming the field."""

import pytest

from common.config import ConfigError, load_config


def test_defaults_are_the_paper():
    c = load_config()
    assert (c.objective.kind, c.objective.variant) == ("minillm", "paper")
    assert c.objective.resolved_discount == 1.0 and c.objective.resolved_pt_kd_ratio == 0.0
    assert (c.learner.lr_schedule, c.learner.warmup_steps, c.learner.sft_lr_schedule) == ("constant", 0, "constant")


def test_lmops_defaults_are_the_released_scripts():
    o = load_config(overrides=["objective.variant=lmops"]).objective
    assert (o.resolved_discount, o.resolved_pt_kd_ratio) == (0.95, 0.5)
    o = load_config(overrides=["objective.variant=lmops", "objective.discount=1", "objective.pt_kd_ratio=0"]).objective
    assert (o.resolved_discount, o.resolved_pt_kd_ratio) == (1.0, 0.0)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["objective.kind=jsd"], "objective.kind"),
        (["objective.beta=1.5"], "objective.beta"),
        (["objective.skew=-0.1"], "objective.skew"),
        (["objective.variant=lmops", "objective.kind=gkd"], "objective.variant"),
        (["objective.discount=0.9"], "objective.discount"),
        (["objective.kind=skew_kl", "objective.on_policy_fraction=0.5"], "objective.on_policy_fraction"),
        (["learner.lr_schedule=step"], "learner.lr_schedule"),
        (["learner.warmup_steps=41"], "learner.warmup_steps"),
        (["learner.sft_warmup_steps=201"], "learner.sft_warmup_steps"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=overrides)
