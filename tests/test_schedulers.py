"""WarmupCosineLR: its factors against the formula, from a YAML config through the CLI's
parser, checkpoint round trip, bad arguments."""

import math

import pytest
import torch

from visdistill import ConfigError, WarmupCosineLR


def _lrs(scheduler: WarmupCosineLR, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_factors_follow_the_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = WarmupCosineLR(opt, warmup=4, total=10, start_factor=0.2, min_factor=0.1)
    lrs = _lrs(sched, opt, 12)
    # warm-up: 0.2 + 0.8 * t / 4
    assert lrs[:4] == pytest.approx([0.1 * f for f in (0.2, 0.4, 0.6, 0.8)])
    # decay over 6 steps from 1 to 0.1, then flat at 0.1
    for t in range(4, 12):
        p = min(1.0, (t - 4) / 6)
        assert lrs[t] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))
    assert lrs[4] == pytest.approx(0.1) and lrs[10] == lrs[11] == pytest.approx(0.01)


def test_resumes_from_its_state_dict():
    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, WarmupCosineLR(opt, warmup=2, total=8)

    opt, sched = fresh()
    _lrs(sched, opt, 5)
    opt2, sched2 = fresh()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert _lrs(sched2, opt2, 3) == pytest.approx(_lrs(sched, opt, 3))


def test_a_config_names_it_and_bad_arguments_name_the_fix(tmp_path):
    from visdistill import DistillationModule, VisionDataModule
    from visdistill.commands.lightning import VisdistillCLI

    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n"
        "  student: {name: resnet10t, num_classes: 10}\n"
        "  scheduler: {class_path: visdistill.WarmupCosineLR, init_args: {warmup: 1, total: 3}}\n"
        "data: {class_path: visdistill.DigitsDataModule}\n"
    )
    cli = VisdistillCLI(
        DistillationModule,
        VisionDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(config), "--trainer.logger", "false"],
    )
    optimizer = torch.optim.SGD(cli.model.student.parameters(), lr=0.1)
    scheduler = cli.model.scheduler_factory(optimizer)
    assert isinstance(scheduler, WarmupCosineLR) and (scheduler.warmup, scheduler.total) == (1, 3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="0 <= warmup < total"):
        WarmupCosineLR(opt, warmup=5, total=5)
    with pytest.raises(ConfigError, match="start_factor"):
        WarmupCosineLR(opt, warmup=1, total=5, start_factor=0.0)
