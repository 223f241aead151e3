"""Training: one step shared by `fit`, the throughput bench and the profiler; the fast on-device
batches and the reference torchvision pipeline; resumable runs.

Fast pipeline: the whole split is one uint8 tensor on the device; each step gathers a batch,
augments it batched on the device (`augment.py`), and runs the method's loss under bf16 autocast +
channels_last where the hardware has bf16. Reference pipeline: the course's way — PNGs decoded per
sample with PIL, torchvision v2 transforms, a DataLoader — kept to measure the fast loop against.
The run folder's files are `run.py`'s business.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .augment import AUGMENTATIONS, augment_batch
from .batch import Batch
from .config import NORM_MEAN, NORM_STD, SELECT_METRICS, Config
from .data.layout import SplitData, load_split
from .errors import UserError, require_writable
from .evaluate import evaluate_split, predict_logits
from .lookahead import Lookahead
from .methods.base import Method, TrainContext, check_groups
from .model import CNN
from .registry import METHODS, SCHEDULES
from .run import Run
from .runtime import Runtime, train_runtime
from .tta import monitor_tta
from .whiten import whiten_conv


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def make_optimizer(params: Iterable[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    params = list(params)
    # No weight decay on biases and batch-norm parameters (the usual choice for small CNNs).
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    return torch.optim.AdamW(groups, lr=t.lr)


def step_module(model: nn.Module, cfg: Config) -> nn.Module:
    """The module a training step calls: `model` itself, or with `train.compile` its torch.compile
    wrapper (sharing the parameters, so checkpoints and evaluation use `model` unchanged)."""
    return torch.compile(model) if cfg.train.compile else model


# ---- batch sources ------------------------------------------------------------------------------

def epoch_order(n: int, weights: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A shuffle of the n images, or n draws with replacement by `weights` (resample, JTT)."""
    if weights is None:
        return torch.randperm(n, device=device)
    return torch.multinomial(weights.float(), n, replacement=True)


def fast_batches(train: SplitData, cfg: Config, order: torch.Tensor) -> Iterator[Batch]:
    """One epoch of augmented, normalised batches gathered from the on-device uint8 tensor."""
    bs = cfg.train.batch_size
    groups = train.groups
    steps = steps_per_epoch(len(order), bs)
    for i in range(steps):
        idx = order[i * bs:(i + 1) * bs]
        yield Batch(augment_batch(train.images[idx], cfg.augment, cfg.geometry), train.labels[idx],
                    train.digits[idx], groups[idx], idx)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size if n >= batch_size else 1  # drop the ragged last batch: BN needs full batches


class FolderDataset(torch.utils.data.Dataset):
    """The course's per-sample pipeline: decode a PNG with PIL, apply torchvision v2 transforms."""

    def __init__(self, root: Path, files: list[str], transform: Any) -> None:
        self.root, self.files, self.transform = root, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.root / self.files[i]) as img:
            return self.transform(img.convert("RGB")), i


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


def reference_loader(cfg: Config, data_dir: str | Path, train: SplitData,
                     weights: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
    """The course's DataLoader; with `weights`, n draws with replacement by them (as `epoch_order`)."""
    t = cfg.train
    sampler = (torch.utils.data.WeightedRandomSampler(weights.float().cpu(), len(train), replacement=True)
               if weights is not None else None)
    return torch.utils.data.DataLoader(
        FolderDataset(Path(data_dir), train.files, reference_transform(cfg)), batch_size=t.batch_size,
        shuffle=sampler is None, sampler=sampler, drop_last=len(train) >= t.batch_size, num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0 and sampler is None)


def reference_batches(loader: torch.utils.data.DataLoader, train: SplitData, cfg: Config,
                      rt: Runtime) -> Iterator[Batch]:
    """Per-sample torchvision pipeline; the composite-specific ops (digit shuffle, patch translate
    and flip) have no torchvision counterpart and run batched afterwards."""
    groups = train.groups
    for x, idx in loader:
        x = x.to(rt.device)
        for name in ("digit_shuffle", "translate"):
            x = AUGMENTATIONS[name](x, cfg.augment, cfg.geometry)
        if cfg.augment.flip in ("patch", "both"):
            x = AUGMENTATIONS["flip"](x, replace(cfg.augment, flip="patch"), cfg.geometry)
        idx = idx.to(train.labels.device)
        yield Batch(x, train.labels[idx], train.digits[idx], groups[idx], idx)


# ---- the step -----------------------------------------------------------------------------------

def train_step(method: Method, opt: torch.optim.Optimizer, batch: Batch, rt: Runtime,
               sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of `method` on `batch`; the detached loss and logits."""
    with rt.autocast():
        loss, logits = method.loss(batch.with_x(rt.prepare(batch.x)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.detach(), logits.detach()


@dataclass
class Trainer:
    """The model and everything that updates it, for one training split."""

    cfg: Config
    rt: Runtime
    train: SplitData
    model: nn.Module
    method: Method
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader | None = None  # the reference pipeline's
    data_dir: str | Path = ""
    lookahead: Lookahead | None = None

    def batches(self) -> Iterator[Batch]:
        """One epoch, drawn as the method asks (a shuffle, or draws by its sample weights)."""
        weights = self.method.sample_weights()
        if self.loader is not None:
            loader = self.loader if weights is None else reference_loader(self.cfg, self.data_dir, self.train, weights)
            return reference_batches(loader, self.train, self.cfg, self.rt)
        return fast_batches(self.train, self.cfg, epoch_order(len(self.train), weights, self.train.labels.device))

    def run_epoch(self, on_step: Callable[[torch.Tensor, torch.Tensor, Batch], None] | None = None) -> int:
        self.model.train()
        seen = 0
        for batch in self.batches():
            loss, logits = train_step(self.method, self.opt, batch, self.rt, self.sched)
            if self.lookahead is not None:
                self.lookahead.step()
            if on_step is not None:
                on_step(loss, logits, batch)
            seen += len(batch)
        return seen


def new_model(rt: Runtime) -> CNN:
    model = CNN().to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model


def build_trainer(cfg: Config, train: SplitData, rt: Runtime, data_dir: str | Path,
                  method: str | None = None, epochs: int | None = None) -> Trainer:
    """A fresh model with `method` (default: the config's) and its optimizer and schedule over
    `epochs` (default: the config's)."""
    t = cfg.train
    model = new_model(rt)
    if t.init == "whiten":
        whiten_conv(model.conv1, train.images)
    name = method or t.method
    hp = cfg.method if name == t.method else {k: p.default for k, p in METHODS[name].hparams.items()}
    ctx = TrainContext(cfg=cfg, train=train, rt=rt, data_dir=str(data_dir),
                       train_erm=lambda n: _train_plain(cfg, train, rt, data_dir, n),
                       predict=lambda m, images: predict_logits(m, images, rt, t.eval_batch_size))
    m = METHODS[name](step_module(model, cfg), hp, ctx)
    opt = make_optimizer([*model.parameters(), *m.extra_parameters()], cfg)
    per_epoch = steps_per_epoch(len(train), t.batch_size)
    total = per_epoch * (epochs or t.epochs)
    sched = SCHEDULES[t.schedule](opt, total, round(min(t.warmup_epochs, epochs or t.epochs) * per_epoch), t.lr)
    loader = reference_loader(cfg, data_dir, train) if t.pipeline == "reference" else None
    lookahead = Lookahead(model, total, t.lookahead) if t.lookahead > 0 else None
    return Trainer(cfg, rt, train, model, m, opt, sched, loader, data_dir, lookahead)


def _train_plain(cfg: Config, train: SplitData, rt: Runtime, data_dir: str | Path, epochs: int) -> nn.Module:
    """A fresh model trained with ERM for `epochs` epochs (JTT's identification model)."""
    trainer = build_trainer(cfg, train, rt, data_dir, method="erm", epochs=epochs)
    for _ in range(epochs):
        trainer.run_epoch()
    return trainer.model.eval()


# ---- data ---------------------------------------------------------------------------------------

def load_data(cfg: Config, data_dir: str | Path, rt: Runtime) -> tuple[SplitData, SplitData]:
    """The training split on the device (a seeded subset with `train.subset`) and val on the CPU."""
    train = load_split(data_dir, "train", cfg.geometry.canvas)
    val = load_split(data_dir, "val", cfg.geometry.canvas)
    if cfg.train.subset:
        # A seeded shuffle before cutting, so a subset holds every class (files are class-sorted).
        g = torch.Generator().manual_seed(cfg.train.seed)
        train = train.take(torch.randperm(len(train), generator=g)[: cfg.train.subset])
    if len(train) < 2:
        raise UserError(f"{data_dir}: the training split has {len(train)} image(s); need at least 2")
    return train.to(rt.device), val


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best: dict[str, float]  # selection-split val metrics of the selected model
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    images_per_s: float = 0.0
    runtime: str = ""


EpochCallback = Callable[[int, dict[str, float]], None]


def _check_resume(state: dict[str, Any], cfg: Config, run: Run) -> None:
    saved_method = state["method"].get("name")
    if saved_method != cfg.train.method:
        raise UserError(f"{run.last_path} holds the state of method {saved_method}, not {cfg.train.method} — "
                        f"resume with --set train.method={saved_method} or start a new --out")
    diffs = Config.from_dict(state["config"]).differences(cfg)
    if diffs:
        raise UserError(f"--resume continues {run.dir} with its saved config, but {len(diffs)} value(s) differ "
                        f"({'; '.join(diffs[:3])}) — drop those options or train into a new --out")


def fit(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
        on_epoch: EpochCallback | None = None, quiet: bool = False) -> TrainResult:
    """Train the required CNN with the configured method; returns the selected model's result.
    `on_epoch` may raise to stop early."""
    run = Run(require_writable(out_dir, "folder"))
    cfg.validate()
    state = run.load_last() if resume else None
    if state is not None:
        _check_resume(state, cfg, run)
    t = cfg.train
    rt = train_runtime(t)
    torch.manual_seed(t.seed)
    train, val = load_data(cfg, data_dir, rt)
    if not val.has_labels:
        raise UserError(f"{data_dir}/val has unlabeled images: val folders must be named by class")
    metric = SELECT_METRICS[t.select]
    if metric != "acc" and not val.has_digits:
        raise UserError(f"train.select={t.select} needs digit labels on val and {data_dir} has none: run "
                        f"`shortcut-study data annotate {data_dir}` or use train.select=val_acc")
    check_groups(METHODS[t.method], train, val, str(data_dir))

    trainer = build_trainer(cfg, train, rt, data_dir)
    model, method, opt, sched = trainer.model, trainer.method, trainer.opt, trainer.sched
    selection = method.selection_split(val)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True) if t.ema_decay else None

    history: list[dict[str, float]] = []
    best_score, best_epoch, start_epoch, prepare_seconds = -math.inf, 0, 1, 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            method.load_state_dict(state["method"]["state"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            if trainer.lookahead is not None and state.get("lookahead"):
                trainer.lookahead.load_state_dict(state["lookahead"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
            raise UserError(f"cannot resume from {run.last_path}: it does not fit this run ({first}) — delete it "
                            "to start afresh") from None
        history, best_score, best_epoch = state["history"], state["best_score"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
    else:
        t_prepare = time.perf_counter()
        method.prepare()  # e.g. JTT's first stage; its time counts as training time
        prepare_seconds = time.perf_counter() - t_prepare

    bar = tqdm(range(start_epoch, t.epochs + 1), desc=f"training ({t.method})", unit="epoch", disable=quiet,
               initial=start_epoch - 1, total=t.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=rt.device)
        correct = torch.zeros((), device=rt.device, dtype=torch.long)

        def tally(loss: torch.Tensor, logits: torch.Tensor, batch: Batch) -> None:
            nonlocal loss_sum, correct
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss * len(batch)
            correct += (logits.argmax(1) == batch.y).sum()

        seen = trainer.run_epoch(tally)
        method.on_epoch_end(epoch)
        train_seconds = time.perf_counter() - t0
        train_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training diverged at epoch {epoch} (loss {train_loss}): "
                                   f"lower train.lr (now {t.lr})")
        eval_model = ema.module if ema is not None else model
        t1 = time.perf_counter()
        # Model selection sees the epochs that are evaluated: every `eval_every`-th and the last.
        evaluated = epoch % t.eval_every == 0 or epoch == t.epochs
        metrics: dict[str, float] = {}
        if evaluated:
            metrics, _ = evaluate_split(eval_model, selection, rt, t.eval_batch_size, monitor_tta(t.tta), cfg.geometry)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": float(correct) / max(1, seen) * 100,
                  "lr": opt.param_groups[0]["lr"], "train_seconds": train_seconds,
                  "eval_seconds": time.perf_counter() - t1, "images_per_s": seen / train_seconds,
                  "prepare_seconds": prepare_seconds if epoch == 1 else 0.0,
                  **{f"val_{k}": v for k, v in metrics.items() if k != "n"}}
        history.append(record)
        score = metrics.get(metric, math.nan)
        if evaluated and (score > best_score or best_epoch == 0):
            best_score, best_epoch = score, epoch
            run.save_model(eval_model, cfg)
        run.save_last({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "ema": ema.state_dict() if ema is not None else None,
                       "lookahead": trainer.lookahead.state_dict() if trainer.lookahead is not None else None,
                       "rng": torch.get_rng_state(),
                       "method": {"name": t.method, "state": method.state_dict()}, "history": history,
                       "best_score": best_score, "best_epoch": best_epoch, "epoch": epoch, "config": cfg.to_dict()})
        run.write_history(history)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{metrics.get('acc', math.nan):.1f}",
                        conflict=f"{metrics.get('conflicting_acc', math.nan):.1f}", ips=f"{record['images_per_s']:.0f}")
        if on_epoch is not None:
            on_epoch(epoch, record)
    bar.close()
    result = summarize(run.dir, history, best_epoch, rt)
    if history:
        selected, _ = run.load(rt.device)
        changed = method.finish(selected)
        if changed:
            run.save_model(selected, cfg)
        if changed or monitor_tta(t.tta) != t.tta:
            # The selected model, scored once with the full test-time augmentation.
            final, _ = evaluate_split(selected, selection, rt, t.eval_batch_size, t.tta, cfg.geometry)
            result.best = {k: v for k, v in final.items() if k != "n"}
    return result


def summarize(out: Path, history: list[dict[str, float]], best_epoch: int, rt: Runtime) -> TrainResult:
    best = next((h for h in history if h["epoch"] == best_epoch), history[-1] if history else {})
    secs = float(sum(h["train_seconds"] + h.get("prepare_seconds", 0.0) for h in history))
    ips = float(np.median([h["images_per_s"] for h in history])) if history else 0.0
    return TrainResult(out, best_epoch, {k[4:]: v for k, v in best.items() if k.startswith("val_")},
                       history, secs, ips, rt.describe())
