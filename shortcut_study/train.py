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

from .augment import AUGMENTATIONS, augment_batch, digit_shuffle
from .batch import Batch
from .config import SELECT_METRICS, Config
from .data.layout import SplitData, load_split, with_recorded_normalization
from .errors import UserError, require_writable
from .crossed import can_cross
from .evaluate import predict_logits, score_split
from .groups import group_ids
from .lookahead import Lookahead
from .methods.base import Method, TrainContext, check_groups
from .metrics import METRICS, Scores, eval_metrics, needs_crossed
from .model import CNN, plain_state_dict
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

def fast_batches(train: SplitData, cfg: Config, order: torch.Tensor) -> Iterator[Batch]:
    """One epoch of augmented, normalised batches gathered from the on-device uint8 tensor, in
    `order` (positions in the training split); each batch's digits and groups are the ones it shows."""
    bs = cfg.train.batch_size
    for i in range(steps_per_epoch(len(order), bs)):
        idx = order[i * bs:(i + 1) * bs]
        x, digits = augment_batch(train.images[idx], train.digits[idx], cfg.augment, cfg.geometry)
        y = train.labels[idx]
        yield Batch(x, y, digits, group_ids(y, digits, cfg.train.groups), idx)


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
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.geometry.mean, cfg.geometry.std)]
    if a.erase_p > 0:
        steps.append(v2.RandomErasing(p=a.erase_p, scale=(a.erase_scale_min, a.erase_scale_max), value=0))
    if a.noise_sigma > 0:
        steps.append(v2.GaussianNoise(sigma=a.noise_sigma, clip=False))
    return v2.Compose(steps)


def reference_loader(cfg: Config, data_dir: str | Path, train: SplitData,
                     order: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
    """The course's DataLoader: a shuffle, or with `order` the method's epoch (positions in the split)."""
    t = cfg.train
    sampler = order.cpu().tolist() if order is not None else None
    n = len(sampler) if sampler is not None else len(train)
    return torch.utils.data.DataLoader(
        FolderDataset(Path(data_dir), train.files, reference_transform(cfg)), batch_size=t.batch_size,
        shuffle=sampler is None, sampler=sampler, drop_last=n >= t.batch_size, num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0 and sampler is None)


def reference_batches(loader: torch.utils.data.DataLoader, train: SplitData, cfg: Config,
                      rt: Runtime) -> Iterator[Batch]:
    """Per-sample torchvision pipeline; the composite-specific ops (digit shuffle, patch translate
    and flip) have no torchvision counterpart and run batched afterwards."""
    for x, idx in loader:
        idx = idx.to(train.labels.device)
        x, digits = digit_shuffle(x.to(rt.device), train.digits[idx], cfg.augment, cfg.geometry)
        x = AUGMENTATIONS["translate"](x, cfg.augment, cfg.geometry)
        if cfg.augment.flip in ("patch", "both"):
            x = AUGMENTATIONS["flip"](x, replace(cfg.augment, flip="patch"), cfg.geometry)
        y = train.labels[idx]
        yield Batch(x, y, digits, group_ids(y, digits, cfg.train.groups), idx)


# ---- the step -----------------------------------------------------------------------------------

def train_step(method: Method, opt: torch.optim.Optimizer, batch: Batch, rt: Runtime,
               sched: torch.optim.lr_scheduler.LRScheduler | None = None,
               grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step of `method` on `batch`: the detached loss and logits, and whether the
    gradient was clipped (`grad_clip` > 0 and its global norm above it; a tensor, so the step
    does not wait for the device)."""
    with rt.autocast():
        loss, logits = method.loss(batch.with_x(rt.prepare(batch.x)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clipped = torch.zeros((), dtype=torch.bool, device=loss.device)
    if grad_clip > 0:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        clipped = torch.nn.utils.clip_grad_norm_(params, grad_clip) > grad_clip
    opt.step()
    if sched is not None:
        sched.step()
    return loss.detach(), logits.detach(), clipped


@dataclass
class Trainer:
    """The model and everything that updates it, for one training split."""

    cfg: Config
    rt: Runtime
    train: SplitData
    model: nn.Module
    method: Method
    opt: torch.optim.Optimizer
    epochs: int  # the length of the schedule (JTT's identification model stops early on it)
    data_dir: str | Path = ""
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    lookahead: Lookahead | None = None
    loader: torch.utils.data.DataLoader | None = None  # the reference pipeline's plain shuffle
    clipped_steps: int = 0  # steps of the last epoch whose gradient `train.grad_clip` scaled down

    def plan(self) -> None:
        """The schedule (and lookahead) over every optimizer step of the run, sized by the method's
        epoch length — known only once its state is (JTT's error set after `prepare` or a resume).
        Made once per trainer: a second scheduler on the same optimizer would compound the first."""
        assert self.sched is None, "plan() runs once per trainer"
        t = self.cfg.train
        per_epoch = steps_per_epoch(self.method.epoch_length(), t.batch_size)
        total = per_epoch * self.epochs
        self.sched = SCHEDULES[t.schedule](self.opt, total, round(min(t.warmup_epochs, self.epochs) * per_epoch), t.lr)
        self.lookahead = Lookahead(self.model, total, t.lookahead) if t.lookahead > 0 else None

    def batches(self) -> Iterator[Batch]:
        """One epoch, in the order the method asks for (a shuffle by default)."""
        order = self.method.epoch_order()
        if self.cfg.train.pipeline == "reference":
            if order is None:
                self.loader = self.loader or reference_loader(self.cfg, self.data_dir, self.train)
                return reference_batches(self.loader, self.train, self.cfg, self.rt)
            return reference_batches(reference_loader(self.cfg, self.data_dir, self.train, order), self.train,
                                     self.cfg, self.rt)
        if order is None:
            order = torch.randperm(len(self.train), device=self.train.labels.device)
        return fast_batches(self.train, self.cfg, order)

    def run_epoch(self, on_step: Callable[[torch.Tensor, torch.Tensor, Batch], None] | None = None) -> int:
        if self.sched is None:
            self.plan()
        self.model.train()
        seen = 0
        clipped = torch.zeros((), dtype=torch.long, device=self.rt.device)
        for batch in self.batches():
            loss, logits, was_clipped = train_step(self.method, self.opt, batch, self.rt, self.sched,
                                                   self.cfg.train.grad_clip)
            clipped += was_clipped
            if self.lookahead is not None:
                self.lookahead.step()
            if on_step is not None:
                on_step(loss, logits, batch)
            seen += len(batch)
        self.clipped_steps = int(clipped)
        return seen


def model_factory(cfg: Config, train: SplitData, rt: Runtime) -> Callable[[], CNN]:
    """A maker of fresh models initialised as `train.init` says: every model of a run (the trained
    one, LfF's biased one, JTT's identification one) starts the same way. The whitened conv1 is
    computed once (about 2 s on the full split) and copied into each."""
    whitened: dict[str, torch.Tensor] = {}
    if cfg.train.init == "whiten":
        probe = CNN().to(rt.device)
        whiten_conv(probe.conv1, train.images, geom=cfg.geometry)
        whitened = {k: v.detach().clone() for k, v in probe.conv1.state_dict().items()}

    def make() -> CNN:
        model = CNN().to(rt.device)
        if whitened:
            model.conv1.load_state_dict(whitened)
        return model.to(memory_format=torch.channels_last) if rt.channels_last else model

    return make


def build_trainer(cfg: Config, train: SplitData, rt: Runtime, data_dir: str | Path,
                  method: str | None = None, epochs: int | None = None,
                  new_model: Callable[[], CNN] | None = None) -> Trainer:
    """A fresh model with `method` (default: the config's) and its optimizer; the schedule over
    `epochs` (default: the config's) is made by `Trainer.plan`, before the first epoch."""
    t = cfg.train
    new_model = new_model or model_factory(cfg, train, rt)
    model = new_model()
    name = method or t.method
    hp = cfg.method if name == t.method else {k: p.default for k, p in METHODS[name].hparams.items()}
    ctx = TrainContext(cfg=cfg, train=train, rt=rt, data_dir=str(data_dir), new_model=new_model,
                       train_erm=lambda n, recipe: _train_plain(recipe, train, rt, data_dir, n, new_model, ctx),
                       predict=lambda m, images: predict_logits(m, images, rt, t.eval_batch_size, geom=cfg.geometry))
    m = METHODS[name](step_module(model, cfg), hp, ctx)
    opt = make_optimizer([*model.parameters(), *m.extra_parameters()], cfg)
    return Trainer(cfg, rt, train, model, m, opt, epochs or t.epochs, data_dir)


def _train_plain(cfg: Config, train: SplitData, rt: Runtime, data_dir: str | Path, epochs: int,
                 new_model: Callable[[], CNN], ctx: TrainContext) -> nn.Module:
    """A model trained with ERM on `cfg`'s recipe — its schedule over the run's `train.epochs` —
    stopped after `epochs` epochs: the epoch-`epochs` snapshot of an ERM run (JTT's identification
    model, as anniesch/jtt takes it from an ERM run's checkpoint at epoch T). Its clipped steps are
    added to `ctx.clipped_steps` (the run that asked for it)."""
    trainer = build_trainer(cfg, train, rt, data_dir, method="erm", new_model=new_model)
    for _ in range(epochs):
        trainer.run_epoch()
        ctx.clipped_steps += trainer.clipped_steps
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


def selection_images(split: SplitData, limit: int) -> SplitData:
    """At most `limit` images of `split` (0 = all), as many of each class as the class allows: a
    seeded shuffle cut class by class, seed 0 whatever the run's, so every run selects on the same
    images and their val numbers compare."""
    if not limit or limit >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    labels = split.labels.cpu()[order]
    classes = labels.unique()
    per_class = max(limit // len(classes), 1)
    keep = torch.cat([order[labels == c][:per_class] for c in classes])
    return split.take(keep.sort().values)


def check_data(cfg: Config, train: SplitData, val: SplitData, data_dir: str | Path) -> None:
    """One-line errors, before any work, when the data cannot serve the config: unlabeled val, a
    selection rule or a method that needs digit labels the data does not have."""
    if not val.has_labels:
        raise UserError(f"{data_dir}/val has unlabeled images: val folders must be named by class")
    t = cfg.train
    metric = METRICS[SELECT_METRICS[t.select]]
    if metric.needs != "labels" and not val.has_digits:
        raise UserError(f"train.select={t.select} needs digit labels on val and {data_dir} has none: run "
                        f"`shortcut-study data annotate {data_dir}` or use train.select=val_acc or worst_class")
    check_groups(METHODS[t.method], train, val, str(data_dir))


def selection_split(cfg: Config, method: Method, val: SplitData, data_dir: str | Path) -> SplitData:
    """The val images the run selects its model on: the method's part of val (DFR keeps the rest),
    cut to `train.val_images`, checked to serve the selection rule."""
    selection = selection_images(method.selection_split(val), cfg.train.val_images)
    check_selection(cfg, selection, data_dir)
    return selection


def check_selection(cfg: Config, selection: SplitData, data_dir: str | Path) -> None:
    """A crossed selection metric needs every digit in the selection split (its donors)."""
    if needs_crossed([SELECT_METRICS[cfg.train.select]]) and not can_cross(selection):
        raise UserError(f"train.select={cfg.train.select} scores the crossed val (each image with each digit), but "
                        f"the {len(selection)} selection images of {data_dir}/val do not show every digit — "
                        "build a larger val split or use train.select=val_acc")


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best: dict[str, float]  # the selected model's val metrics (selection split, run's views, crossed too)
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    images_per_s: float = 0.0
    runtime: str = ""
    model: nn.Module | None = None  # the selected model, in memory (also the run's q1_model.pt)
    cfg: Config | None = None
    val_scores: Scores | None = None  # its predictions on the selection split, natural and crossed
    # Per further selection rule asked of `fit` (`also_select`): the epoch that rule selects and that
    # epoch's model (the same object as `model` when the epochs agree).
    also: dict[str, tuple[int, nn.Module]] = field(default_factory=dict)


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


@dataclass
class Progress:
    """What the loop carries from epoch to epoch, and what `last.pt` saves of it."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    epoch: int = 0  # the last finished epoch
    best_weights: dict[str, torch.Tensor] | None = None  # the selected model's, on the CPU
    # Its val scores, when its epoch scored what the run's result needs (the run's views and the
    # crossed val): `_finish` then reuses them instead of scoring the same model again. Not saved.
    best_scores: Scores | None = None
    # Further selection rules (`fit(also_select=...)`): rule -> {"score", "epoch", "weights"}.
    also: dict[str, dict[str, Any]] = field(default_factory=dict)

    def offer(self, rule: str, score: float, epoch: int, model: nn.Module) -> None:
        """Keep `model` as `rule`'s selection if it scores better than the one kept (or none is)."""
        kept = self.also.get(rule)
        if kept is None or score > kept["score"] or math.isnan(kept["score"]):
            self.also[rule] = {"score": score, "epoch": epoch, "weights": plain_state_dict(model)}


def _restore(trainer: Trainer, ema: AveragedModel | None, state: dict[str, Any], run: Run) -> Progress:
    """The trainer and the loop's progress as `last.pt` saved them."""
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.opt.load_state_dict(state["optimizer"])
        trainer.method.load_state_dict(state["method"]["state"])
        trainer.plan()  # sized by the restored method state (JTT's error set)
        trainer.sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        if trainer.lookahead is not None and state.get("lookahead"):
            trainer.lookahead.load_state_dict(state["lookahead"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        best = run.load(trainer.rt.device)[0] if state["best_epoch"] else None
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
        raise UserError(f"cannot resume from {run.last_path}: it does not fit this run ({first}) — delete it "
                        "to start afresh") from None
    return Progress(state["history"], state["best_score"], state["best_epoch"], state["epoch"],
                    plain_state_dict(best) if best is not None else None, also=state.get("also") or {})


def _checkpoint(run: Run, trainer: Trainer, ema: AveragedModel | None, progress: Progress, cfg: Config) -> None:
    """`last.pt` (everything `--resume` needs) and `history.csv` after an epoch."""
    t = trainer
    run.save_last({"model": t.model.state_dict(), "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(),
                   "ema": ema.state_dict() if ema is not None else None,
                   "lookahead": t.lookahead.state_dict() if t.lookahead is not None else None,
                   "rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                   "method": {"name": cfg.train.method, "state": t.method.state_dict()}, "history": progress.history,
                   "best_score": progress.best_score, "best_epoch": progress.best_epoch, "epoch": progress.epoch,
                   "also": progress.also, "config": cfg.to_dict()})
    run.write_history(progress.history)


def _train_epoch(trainer: Trainer, ema: AveragedModel | None) -> tuple[float, float, int, float]:
    """One epoch of optimizer steps: mean loss, accuracy (%), images seen, seconds."""
    model, rt = trainer.model, trainer.rt
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)

    def tally(loss: torch.Tensor, logits: torch.Tensor, batch: Batch) -> None:
        nonlocal loss_sum, correct
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss * len(batch)
        correct += (logits.argmax(1) == batch.y).sum()

    rt.synchronize()
    t0 = time.perf_counter()
    seen = trainer.run_epoch(tally)
    rt.synchronize()
    seconds = time.perf_counter() - t0
    return float(loss_sum) / max(1, seen), float(correct) / max(1, seen) * 100, seen, seconds


def fit_replacing(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
                  state: dict[str, Any] | None = None) -> TrainResult:
    """`fit` for the `train` command. A fresh run over a folder that holds an earlier one trains in a
    staging folder beside it and is swapped in whole: an error, a full disk or Ctrl-C leaves the
    earlier run as it was, never its files mixed with new ones. A resumed run continues in place, and
    a fresh one into an empty folder trains there (so it can be resumed if interrupted)."""
    from .outputs import replace_folder

    out = Path(out_dir)
    if resume or not Run(out).holds_a_run():
        return fit(cfg, data_dir, out, resume=resume, state=state)
    with replace_folder(out) as stage:
        result = fit(cfg, data_dir, stage)
    return replace(result, out_dir=out)


def fit(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False,
        on_epoch: EpochCallback | None = None, quiet: bool = False,
        state: dict[str, Any] | None = None, also_select: tuple[str, ...] = ()) -> TrainResult:
    """Train the required CNN with the configured method; returns the selected model (in memory and
    in the run folder) with its val metrics. With `resume`, continues from `state` (or the run's
    `last.pt` when not given). `on_epoch` may raise to stop early. `also_select` names further
    selection rules (values of `train.select`): the epoch each selects, and its model, come back in
    `result.also` — one run serves every rule (the benchmark's), as SubpopBench's rules all read
    the checkpoints of one run."""
    run = Run(require_writable(out_dir, "folder"))
    cfg = with_recorded_normalization(cfg, data_dir)
    cfg.validate()
    if resume:
        state = state if state is not None else run.load_last()
        _check_resume(state, cfg, run)
    else:
        state = None
    t = cfg.train
    rt = train_runtime(t)
    torch.manual_seed(t.seed)
    train, val = load_data(cfg, data_dir, rt)
    check_data(cfg, train, val, data_dir)
    trainer = build_trainer(cfg, train, rt, data_dir)
    model, method = trainer.model, trainer.method
    selection = selection_split(cfg, method, val, data_dir)
    agreement = float((train.digits == train.labels).float().mean()) if train.has_digits else math.nan
    select_key = SELECT_METRICS[t.select]
    also_keys = {rule: SELECT_METRICS[rule] for rule in also_select if rule != t.select}
    crossed_each_epoch = needs_crossed([select_key, *also_keys.values()])
    # An epoch's val scores are the run's result too when they hold what it needs (see Progress).
    epoch_scores_complete = crossed_each_epoch and monitor_tta(t.tta) == t.tta
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True) if t.ema_decay else None

    prepare_seconds = 0.0
    if state is not None:
        progress = _restore(trainer, ema, state, run)
    else:
        progress = Progress()
        t_prepare = time.perf_counter()
        method.prepare()  # e.g. JTT's first stage; its time counts as training time
        prepare_seconds = time.perf_counter() - t_prepare
        trainer.plan()

    bar = tqdm(range(progress.epoch + 1, t.epochs + 1), desc=f"training ({t.method})", unit="epoch", disable=quiet,
               initial=progress.epoch, total=t.epochs)
    for epoch in bar:
        train_loss, train_acc, seen, train_seconds = _train_epoch(trainer, ema)
        method.on_epoch_end(epoch)
        if not math.isfinite(train_loss):
            knobs = [f"train.lr (now {t.lr})"] + [f"method.{k} (now {v})" for k, v in cfg.method.items()
                                                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
            raise TrainingDiverged(f"training diverged at epoch {epoch} (loss {train_loss}): lower "
                                   + " or ".join(knobs))
        eval_model = ema.module if ema is not None else model
        t1 = time.perf_counter()
        # Model selection sees the epochs that are evaluated: every `eval_every`-th and the last.
        evaluated = epoch % t.eval_every == 0 or epoch == t.epochs
        metrics: dict[str, float] = {}
        scores = None
        if evaluated:
            scores = score_split(eval_model, selection, rt, t.eval_batch_size, monitor_tta(t.tta), cfg.geometry,
                                 crossed=crossed_each_epoch, train_agreement=agreement)
            metrics = eval_metrics(scores)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                  "lr": trainer.opt.param_groups[0]["lr"], "train_seconds": train_seconds,
                  "eval_seconds": time.perf_counter() - t1, "images_per_s": seen / train_seconds,
                  "prepare_seconds": prepare_seconds if epoch == 1 else 0.0,
                  "clipped_steps": trainer.clipped_steps + (method.ctx.clipped_steps if epoch == 1 else 0),
                  **{f"val_{k}": v for k, v in metrics.items() if k in METRICS}}
        progress.history.append(record)
        progress.epoch = epoch
        score = metrics.get(select_key, math.nan)
        if evaluated and (score > progress.best_score or progress.best_epoch == 0):
            progress.best_score, progress.best_epoch = score, epoch
            progress.best_weights = plain_state_dict(eval_model)
            progress.best_scores = scores if epoch_scores_complete else None
            run.save_model(eval_model, cfg)
        if evaluated:
            for rule, key in also_keys.items():
                progress.offer(rule, metrics.get(key, math.nan), epoch, eval_model)
        _checkpoint(run, trainer, ema, progress, cfg)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{metrics.get('acc', math.nan):.1f}",
                        conflict=f"{metrics.get('conflicting_acc', math.nan):.1f}", ips=f"{record['images_per_s']:.0f}")
        if on_epoch is not None:
            on_epoch(epoch, record)
    bar.close()
    return _finish(run, trainer, progress, selection, cfg, agreement)


def finish_trained(model: nn.Module, cfg: Config, data_dir: str | Path) -> nn.Module:
    """A post-hoc method (`Method.post_hoc`: DFR) applied to `model`, an ERM model trained
    elsewhere on the same data and recipe (the strength grid's ERM cell): the method's own
    selection split and last word, as `fit` runs them, without training again. Returns a refitted
    copy; `model` is left as it was."""
    import copy

    cfg = with_recorded_normalization(cfg, data_dir)
    cfg.validate()
    if not METHODS[cfg.train.method].post_hoc:
        raise UserError(f"method {cfg.train.method} trains a model of its own: only a post-hoc method (one that "
                        "refits a trained ERM model, e.g. dfr) can take another run's model")
    rt = train_runtime(cfg.train)
    torch.manual_seed(cfg.train.seed)
    train, val = load_data(cfg, data_dir, rt)
    check_data(cfg, train, val, data_dir)
    refit = copy.deepcopy(model).to(rt.device)
    trainer = build_trainer(cfg, train, rt, data_dir, new_model=lambda: refit)
    selection_split(cfg, trainer.method, val, data_dir)
    trainer.method.finish(refit)
    return refit.eval()


def _finish(run: Run, trainer: Trainer, progress: Progress, selection: SplitData, cfg: Config,
            agreement: float) -> TrainResult:
    """The selected model, after the method's last word (DFR's refit), scored once on the selection
    split with the run's full test-time views and the crossed val: the run's result."""
    result = result_of(run.dir, progress.history, progress.best_epoch, trainer.rt)
    result.cfg = cfg
    if progress.best_weights is None:
        return result
    t = cfg.train
    selected = _finished_model(trainer, progress.best_weights)
    if trainer.method.finish(selected):
        run.save_model(selected, cfg)
        progress.best_scores = None  # refit (DFR): scored anew
    for rule, kept in progress.also.items():
        if kept["epoch"] == progress.best_epoch:
            result.also[rule] = (kept["epoch"], selected.eval())
        else:
            other = _finished_model(trainer, kept["weights"])
            trainer.method.finish(other)
            result.also[rule] = (kept["epoch"], other.eval())
    result.val_scores = progress.best_scores
    if result.val_scores is None:
        result.val_scores = score_split(selected, selection, trainer.rt, t.eval_batch_size, t.tta, cfg.geometry,
                                        train_agreement=agreement)
    result.best = {k: v for k, v in eval_metrics(result.val_scores).items() if k in METRICS}
    result.model = selected.eval()
    return result


def _finished_model(trainer: Trainer, weights: dict[str, torch.Tensor]) -> CNN:
    model = CNN().to(trainer.rt.device)
    model.load_state_dict(weights)
    return model.to(memory_format=torch.channels_last) if trainer.rt.channels_last else model


def result_of(out: Path, history: list[dict[str, float]], best_epoch: int, rt: Runtime) -> TrainResult:
    best = next((h for h in history if h["epoch"] == best_epoch), history[-1] if history else {})
    secs = float(sum(h["train_seconds"] + h.get("prepare_seconds", 0.0) for h in history))
    ips = float(np.median([h["images_per_s"] for h in history])) if history else 0.0
    return TrainResult(out, best_epoch, {k[4:]: v for k, v in best.items() if k.startswith("val_")},
                       history, secs, ips, rt.describe())
