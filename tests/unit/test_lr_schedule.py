"""learner/lr_schedule.py against Hugging Face's schedulers (what the paper's released scripts step) and by hand."""

import math

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from learner.lr_schedule import lr_at

HF = {
    "constant": lambda opt, w, n: get_constant_schedule_with_warmup(opt, w),
    "cosine": get_cosine_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
}


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (1, 2)])
def test_lr_of_every_update_is_hugging_faces(schedule, warmup, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = HF[schedule](opt, warmup, total)
    for k in range(total):
        assert lr_at(k, 0.3, schedule, warmup, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_by_hand():
    assert lr_at(0, 1.0, "constant", 4, 10) == 0.0
    assert lr_at(2, 1.0, "constant", 4, 10) == 0.5
    assert lr_at(4, 1.0, "cosine", 4, 10) == 1.0
    assert lr_at(7, 1.0, "cosine", 4, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_at(7, 1.0, "linear", 4, 10) == pytest.approx(0.5)
    assert lr_at(100, 1.0, "linear", 4, 10) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(5, 1.0, "step", 0, 10)
