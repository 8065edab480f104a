"""Parameter groups and learning-rate schedules of the specs."""

import pytest
import torch

from qpm_dist.config import ModelConfig, OptimConfig, ScheduleConfig
from qpm_dist.engine.optim import LRFactor, build_optimizer, build_scheduler, classifier_param_groups
from qpm_dist.models.net import build_model


def test_dense_groups_use_head_lr_and_norm_weight_decay():
    model = build_model(ModelConfig(arch="tiny_resnet", tiny_width=8), num_classes=4)
    cfg = OptimConfig(lr=0.005, head_lr=0.01, weight_decay=5e-4, norm_weight_decay=0.0)
    opt = build_optimizer(classifier_param_groups(model, cfg), cfg)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    head_w, conv_w, bn_w = model.head.linear.weight, model.backbone.conv1.weight, model.backbone.bn1.weight
    assert by_param[id(head_w)]["lr"] == 0.01 and by_param[id(head_w)]["weight_decay"] == 5e-4
    assert by_param[id(conv_w)]["lr"] == 0.005 and by_param[id(conv_w)]["weight_decay"] == 5e-4
    assert by_param[id(bn_w)]["lr"] == 0.005 and by_param[id(bn_w)]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_step_schedule_matches_reference_steplr():
    # dense phase: StepLR(30 epochs, x0.4) stepped once per epoch -> 5e-3, 2e-3, 8e-4, 3.2e-4, 1.28e-4
    f = LRFactor(ScheduleConfig(name="step", step_epochs=30, gamma=0.4), steps_per_epoch=7, epochs=150)
    lrs = [0.005 * f(epoch * 7 + 3) for epoch in (0, 29, 30, 60, 90, 120, 149)]
    assert lrs == pytest.approx([5e-3, 5e-3, 2e-3, 8e-4, 3.2e-4, 1.28e-4, 1.28e-4])


def test_warmup_cosine_and_linear():
    cos = LRFactor(ScheduleConfig(name="cosine", warmup_epochs=1, min_lr_ratio=0.1), steps_per_epoch=10, epochs=5)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(50) == pytest.approx(0.1)
    assert cos(30) == pytest.approx(0.1 + 0.9 * 0.5)
    lin = LRFactor(ScheduleConfig(name="linear"), steps_per_epoch=10, epochs=2)
    assert [lin(s) for s in (0, 10, 20)] == pytest.approx([1.0, 0.5, 0.0])


def test_scheduler_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(name="step", step_epochs=1, gamma=0.5), steps_per_epoch=2, epochs=4)
    for _ in range(3):
        opt.step(); sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([p], lr=1.0)
    sched2 = build_scheduler(opt2, ScheduleConfig(name="step", step_epochs=1, gamma=0.5), steps_per_epoch=2, epochs=4)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.5]
