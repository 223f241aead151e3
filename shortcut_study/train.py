"""Training: the fast on-device loop, the reference torchvision pipeline, schedules, checkpoints.

Fast pipeline: the whole split is one uint8 tensor on the device; each step gathers a batch,
augments it batched on the device (`augment.py`), and runs the method's loss under bf16 autocast +
channels_last where the hardware has bf16. Reference pipeline: the course's way — PNGs decoded per
sample with PIL, torchvision v2 transforms, a DataLoader — kept to measure the fast loop against.

A run folder holds `q1_model.pt` (best-on-val plain state_dict), `last.pt` (everything needed to
resume), `history.csv` and `config.json`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .augment import AUGMENTATIONS, augment_batch
from .config import NORM_MEAN, NORM_STD, Config
from .data.layout import SplitData, load_split
from .errors import UserError, atomic_path, write_text_atomic
from .evaluate import evaluate_split, monitor_tta
from .methods import METHODS
from .model import CNN, load_model, plain_state_dict
from .runtime import Runtime, resolve_runtime


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ---- learning-rate schedules: name -> builder(optimizer, total_steps, warmup_steps, lr) ----------

def _with_warmup(opt: torch.optim.Optimizer, warmup: int, main: lrs.LRScheduler) -> lrs.LRScheduler:
    if warmup <= 0:
        return main
    ramp = lrs.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return lrs.SequentialLR(opt, [ramp, main], milestones=[warmup])


def _cosine(opt, total, warmup, lr):
    return _with_warmup(opt, warmup, lrs.CosineAnnealingLR(opt, T_max=max(1, total - warmup)))


def _linear(opt, total, warmup, lr):
    return _with_warmup(opt, warmup, lrs.LinearLR(opt, 1.0, 0.0, total_iters=max(1, total - warmup)))


def _step(opt, total, warmup, lr):
    rest = max(1, total - warmup)
    return _with_warmup(opt, warmup, lrs.MultiStepLR(opt, [rest // 2, rest * 3 // 4], gamma=0.1))


def _onecycle(opt, total, warmup, lr):
    return lrs.OneCycleLR(opt, max_lr=lr, total_steps=max(2, total), pct_start=min(0.5, max(0.05, warmup / max(1, total))))


def _constant(opt, total, warmup, lr):
    return _with_warmup(opt, warmup, lrs.ConstantLR(opt, factor=1.0, total_iters=0))


SCHEDULES: dict[str, Callable[..., lrs.LRScheduler]] = {
    "cosine": _cosine, "linear": _linear, "step": _step, "onecycle": _onecycle, "constant": _constant,
}


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    # No weight decay on biases and batch-norm parameters (the usual choice for small CNNs).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    return torch.optim.AdamW(groups, lr=t.lr)


def step_module(model: nn.Module, cfg: Config) -> nn.Module:
    """The module a training step calls: `model` itself, or with `train.compile` its torch.compile
    wrapper (sharing the parameters, so checkpoints and evaluation use `model` unchanged)."""
    return torch.compile(model) if cfg.train.compile else model


# ---- batch sources ------------------------------------------------------------------------------

def fast_batches(train: SplitData, cfg: Config, rt: Runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of augmented, normalised batches gathered from the on-device uint8 tensor."""
    n, bs = len(train), cfg.train.batch_size
    perm = torch.randperm(n, device=train.images.device)
    steps = n // bs if n >= bs else 1  # drop the ragged last batch: BN needs full batches
    for i in range(steps):
        idx = perm[i * bs:(i + 1) * bs]
        yield augment_batch(train.images[idx], cfg.augment, cfg.geometry), train.labels[idx]


class FolderDataset(torch.utils.data.Dataset):
    """The course's per-sample pipeline: decode a PNG with PIL, apply torchvision v2 transforms."""

    def __init__(self, root: Path, files: list[str], labels: torch.Tensor, transform: Any) -> None:
        self.root, self.files, self.labels, self.transform = root, files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.root / self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def reference_transform(cfg: Config):
    from torchvision.transforms import v2

    a = cfg.augment
    steps: list[Any] = [v2.ToImage()]
    if a.flip in ("image", "both") and a.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(a.flip_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(NORM_MEAN, NORM_STD)]
    if a.erase_p > 0:
        steps.append(v2.RandomErasing(p=a.erase_p, scale=(a.erase_scale_min, a.erase_scale_max), value=0))
    if a.noise_sigma > 0:
        steps.append(v2.GaussianNoise(sigma=a.noise_sigma, clip=False))
    return v2.Compose(steps)


def reference_batches(loader: torch.utils.data.DataLoader, cfg: Config, rt: Runtime):
    """Per-sample torchvision pipeline; the composite-specific ops (digit shuffle, patch translate
    and flip) have no torchvision counterpart and run batched afterwards."""
    for x, y in loader:
        x = x.to(rt.device)
        for name in ("digit_shuffle", "translate"):
            x = AUGMENTATIONS[name](x, cfg.augment, cfg.geometry)
        if cfg.augment.flip in ("patch", "both"):
            x = AUGMENTATIONS["flip"](x, replace(cfg.augment, flip="patch"), cfg.geometry)
        yield x, y.to(rt.device)


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best: dict[str, float]  # val metrics of the best epoch
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    images_per_s: float = 0.0
    runtime: str = ""


EpochCallback = Callable[[int, dict[str, float]], None]


def _save_last(path: Path, **state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_last(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or foreign file
        raise UserError(f"cannot resume from {path} ({type(exc).__name__}): delete it to start afresh") from None


def load_data(cfg: Config, data_dir: str | Path, rt: Runtime) -> tuple[SplitData, SplitData]:
    train = load_split(data_dir, "train", cfg.geometry.canvas)
    val = load_split(data_dir, "val", cfg.geometry.canvas)
    if cfg.train.subset:
        # A seeded shuffle before cutting, so a subset holds every class (files are class-sorted).
        g = torch.Generator().manual_seed(cfg.train.seed)
        order = torch.randperm(len(train), generator=g)[: cfg.train.subset]
        train = SplitData(train.images[order], train.labels[order], train.digits[order],
                          [train.files[i] for i in order.tolist()])
    if len(train) < 2:
        raise UserError(f"{data_dir}: the training split has {len(train)} image(s); need at least 2")
    train.images, train.labels = train.images.to(rt.device), train.labels.to(rt.device)
    return train, val


def fit(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
        on_epoch: EpochCallback | None = None, quiet: bool = False) -> TrainResult:
    """Train the required CNN; returns the best-on-val result. `on_epoch` may raise to stop early."""
    out = Path(out_dir)
    last_path = out / "last.pt"
    state = _load_last(last_path) if resume and last_path.is_file() else None
    if state is not None:
        cfg = Config.from_dict(state["config"])  # a resumed run keeps the config it started with
    cfg.validate()
    t = cfg.train
    rt = resolve_runtime(t.device, t.precision, t.channels_last)
    torch.manual_seed(t.seed)
    train, val = load_data(cfg, data_dir, rt)
    if not val.has_labels:
        raise UserError(f"{data_dir}/val has unlabeled images: val folders must be named by class")

    model = CNN().to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train) // t.batch_size)
    total = steps_per_epoch * t.epochs
    sched = SCHEDULES[t.schedule](opt, total, round(t.warmup_epochs * steps_per_epoch), t.lr)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True) if t.ema_decay else None
    method = METHODS[t.method]
    stepper = step_module(model, cfg)

    history: list[dict[str, float]] = []
    best_acc, best_epoch, start_epoch = -math.inf, 0, 1
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        history, best_acc, best_epoch = state["history"], state["best_acc"], state["best_epoch"]
        start_epoch = state["epoch"] + 1

    loader = None
    if t.pipeline == "reference":
        loader = torch.utils.data.DataLoader(
            FolderDataset(Path(data_dir), train.files, train.labels.cpu(), reference_transform(cfg)),
            batch_size=t.batch_size, shuffle=True, drop_last=len(train) >= t.batch_size,
            num_workers=t.num_workers, persistent_workers=t.num_workers > 0)

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    bar = tqdm(range(start_epoch, t.epochs + 1), desc="training", unit="epoch", disable=quiet,
               initial=start_epoch - 1, total=t.epochs)
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=rt.device)
        correct = torch.zeros((), device=rt.device, dtype=torch.long)
        seen = 0
        batches = reference_batches(loader, cfg, rt) if loader is not None else fast_batches(train, cfg, rt)
        for x, y in batches:
            with rt.autocast():
                loss, logits = method(stepper, rt.prepare(x), y, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        train_seconds = time.perf_counter() - t0
        train_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training diverged at epoch {epoch} (loss {train_loss}): "
                                   f"lower train.lr (now {t.lr})")
        eval_model = ema.module if ema is not None else model
        t1 = time.perf_counter()
        metrics, _ = evaluate_split(eval_model, val, rt, t.eval_batch_size, monitor_tta(t.tta), cfg.geometry)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": float(correct) / max(1, seen) * 100,
                  "lr": opt.param_groups[0]["lr"], "train_seconds": train_seconds,
                  "eval_seconds": time.perf_counter() - t1, "images_per_s": seen / train_seconds,
                  **{f"val_{k}": v for k, v in metrics.items() if k != "n"}}
        history.append(record)
        if metrics["acc"] > best_acc:
            best_acc, best_epoch = metrics["acc"], epoch
            with atomic_path(out / "q1_model.pt") as tmp:
                torch.save(plain_state_dict(eval_model), tmp)
        _save_last(last_path, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                   ema=ema.state_dict() if ema is not None else None, rng=torch.get_rng_state(),
                   history=history, best_acc=best_acc, best_epoch=best_epoch, epoch=epoch, config=cfg.to_dict())
        with atomic_path(out / "history.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{metrics['acc']:.1f}",
                        conflict=f"{metrics.get('conflicting_acc', math.nan):.1f}", ips=f"{record['images_per_s']:.0f}")
        if on_epoch is not None:
            on_epoch(epoch, record)
    bar.close()
    result = summarize(out, history, best_epoch, rt)
    if monitor_tta(t.tta) != t.tta and history:
        # The selected model, evaluated once with the full test-time augmentation.
        final, _ = evaluate_split(load_model(out / "q1_model.pt", rt.device), val, rt, t.eval_batch_size, t.tta,
                                  cfg.geometry)
        result.best = {k: v for k, v in final.items() if k != "n"}
    return result


def summarize(out: Path, history: list[dict[str, float]], best_epoch: int, rt: Runtime) -> TrainResult:
    best = next((h for h in history if h["epoch"] == best_epoch), history[-1] if history else {})
    secs = float(sum(h["train_seconds"] for h in history))
    ips = float(np.median([h["images_per_s"] for h in history])) if history else 0.0
    return TrainResult(out, best_epoch, {k[4:]: v for k, v in best.items() if k.startswith("val_")},
                       history, secs, ips, rt.describe())
