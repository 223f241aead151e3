"""Learning-rate schedules, found by name (`train.schedule`): builder(optimizer, total_steps,
warmup_steps, lr) -> a torch scheduler stepped once per optimizer step."""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as lrs

from .registry import SCHEDULES


def _with_warmup(opt: torch.optim.Optimizer, warmup: int, main: lrs.LRScheduler) -> lrs.LRScheduler:
    if warmup <= 0:
        return main
    ramp = lrs.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return lrs.SequentialLR(opt, [ramp, main], milestones=[warmup])


@SCHEDULES.register("cosine")
def cosine(opt: torch.optim.Optimizer, total: int, warmup: int, lr: float) -> lrs.LRScheduler:
    return _with_warmup(opt, warmup, lrs.CosineAnnealingLR(opt, T_max=max(1, total - warmup)))


@SCHEDULES.register("linear")
def linear(opt: torch.optim.Optimizer, total: int, warmup: int, lr: float) -> lrs.LRScheduler:
    return _with_warmup(opt, warmup, lrs.LinearLR(opt, 1.0, 0.0, total_iters=max(1, total - warmup)))


@SCHEDULES.register("step")
def step(opt: torch.optim.Optimizer, total: int, warmup: int, lr: float) -> lrs.LRScheduler:
    rest = max(1, total - warmup)
    return _with_warmup(opt, warmup, lrs.MultiStepLR(opt, [rest // 2, rest * 3 // 4], gamma=0.1))


@SCHEDULES.register("onecycle")
def onecycle(opt: torch.optim.Optimizer, total: int, warmup: int, lr: float) -> lrs.LRScheduler:
    # OneCycleLR divides by (pct_start * total_steps - 1) and by the rest: both phases need a step or
    # more, so a run of very few steps gets a schedule a little longer than itself (never reached).
    steps = max(4, total)
    pct = min(0.5, max(0.05, warmup / steps, 1.5 / steps))
    return lrs.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct)


@SCHEDULES.register("constant")
def constant(opt: torch.optim.Optimizer, total: int, warmup: int, lr: float) -> lrs.LRScheduler:
    return _with_warmup(opt, warmup, lrs.ConstantLR(opt, factor=1.0, total_iters=0))
