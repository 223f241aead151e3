"""One typed configuration tree for the whole tool, with defaults that serve.

Every field is reachable from the command line as ``--set section.field=value`` and presets are
TOML files of the same shape (``shortcut_study/presets/NAME.toml``, shipped with the package). The flattened tree is what gets
logged to MLflow with each run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .registry import GROUPINGS, METHODS, SCHEDULES, TTA

# Presets ship inside the package, so an installed tool (`uv tool install .`) finds them too.
PRESET_DIR = Path(__file__).resolve().parent / "presets"

CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
NUM_CLASSES = 10
NUM_DIGITS = 10  # values of the spurious attribute (the MNIST digit)
# The handout's channel-wise normalisation constants (what the 40x40 course layout gives): the
# default of `geometry.norm_mean` / `geometry.norm_std`.
NORM_MEAN = (0.438, 0.435, 0.422)
NORM_STD = (0.228, 0.225, 0.231)
FROM_DATASET = "dataset"  # geometry.norm_*: the statistics `data build` recorded for the training split


def _triple(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    _check(len(values) == 3 and all(math.isfinite(v) for v in values), name, text,
           f"three comma-separated numbers (R,G,B), or '{FROM_DATASET}'")
    return values  # type: ignore[return-value]


def _shown(value: Any) -> str:
    """A value as an error line shows it: a number of hundreds of digits (an int from 1e308) in short."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"{value:.3g}"
    return repr(value)


def _check(ok: bool, name: str, value: Any, want: str) -> None:
    if not ok:
        raise UserError(f"bad config value {name}={_shown(value)}: must be {want}")


@dataclass(frozen=True)
class Param:
    """One hyperparameter declared once: its default, the range a search draws from (`low`..`high`,
    log-scaled or not, or `choices`) and the range a user may set (`minimum`..`maximum`)."""

    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    minimum: float = -math.inf
    maximum: float = math.inf
    help: str = ""
    search: bool = True  # False: a switch the user sets, never drawn by a search

    @property
    def kind(self) -> type:
        return type(self.default)

    def convert(self, name: str, value: Any) -> Any:
        value = _convert(value, self.kind, name)
        if self.choices:
            _check(value in self.choices, name, value, f"one of {', '.join(map(str, self.choices))}")
        elif self.kind in (int, float):
            _check(math.isfinite(value) and self.minimum <= value <= self.maximum, name, value,
                   f"in [{self.minimum}, {self.maximum}]")
        return value

    def suggest(self, trial: Any, key: str) -> Any:
        """Draw a value from an Optuna trial."""
        if self.choices:
            return trial.suggest_categorical(key, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(key, float(self.low), float(self.high), log=self.log)


@dataclass
class GeometryConfig:
    """Where the CIFAR image and the MNIST digit sit on the canvas (default: the course's layout)."""

    canvas: int = 40
    gray: int = 127
    cifar_size: int = 24
    cifar_top: int = 0
    cifar_left: int = 0
    digit_size: int = 16
    digit_top: int = 24
    digit_left: int = 24
    # Channel-wise normalisation, (x / 255 - mean) / std, R,G,B: the handout's constants by default;
    # `dataset` takes what `data build` measured on the training split (for another layout), and a
    # run records the numbers it used.
    norm_mean: str = ",".join(map(str, NORM_MEAN))
    norm_std: str = ",".join(map(str, NORM_STD))

    @property
    def mean(self) -> tuple[float, float, float]:
        return _triple(self.norm_mean, "geometry.norm_mean")

    @property
    def std(self) -> tuple[float, float, float]:
        return _triple(self.norm_std, "geometry.norm_std")

    def validate(self) -> None:
        _check(self.canvas >= 8, "geometry.canvas", self.canvas, ">= 8")
        for name, text in (("geometry.norm_mean", self.norm_mean), ("geometry.norm_std", self.norm_std)):
            if text != FROM_DATASET:
                _triple(text, name)
        if self.norm_std != FROM_DATASET:
            _check(min(self.std) > 0, "geometry.norm_std", self.norm_std, "positive for every channel")
        _check(0 <= self.gray <= 255, "geometry.gray", self.gray, "in 0..255")
        for name, size, top, left in (
            ("cifar", self.cifar_size, self.cifar_top, self.cifar_left),
            ("digit", self.digit_size, self.digit_top, self.digit_left),
        ):
            _check(4 <= size <= self.canvas, f"geometry.{name}_size", size,
                   f"between 4 and geometry.canvas ({self.canvas})")
            _check(0 <= top and top + size <= self.canvas, f"geometry.{name}_top", top,
                   f"such that the {name} patch fits the {self.canvas}px canvas")
            _check(0 <= left and left + size <= self.canvas, f"geometry.{name}_left", left,
                   f"such that the {name} patch fits the {self.canvas}px canvas")

    def with_corner_digit(self, size: int) -> GeometryConfig:
        """This layout with a `size`-pixel digit in the canvas' bottom-right corner (the course's place)."""
        return dataclasses.replace(self, digit_size=size, digit_top=self.canvas - size, digit_left=self.canvas - size)

    @property
    def cifar_box(self) -> tuple[slice, slice]:
        return (slice(self.cifar_top, self.cifar_top + self.cifar_size),
                slice(self.cifar_left, self.cifar_left + self.cifar_size))

    @property
    def digit_box(self) -> tuple[slice, slice]:
        return (slice(self.digit_top, self.digit_top + self.digit_size),
                slice(self.digit_left, self.digit_left + self.digit_size))


@dataclass
class BuildConfig:
    """How the composite dataset is drawn from CIFAR-10 and MNIST."""

    seed: int = 0
    train_size: int = 45_000
    val_size: int = 5_000
    test_size: int = 10_000
    # Fraction of training images whose digit equals the label. 0.64 = the course's rate
    # (digit = label with probability 0.6, else a uniform digit). 0.1 = no shortcut.
    train_agreement: float = 0.64
    eval_agreement: float = 0.1

    def validate(self) -> None:
        _check(0 <= self.seed < 2**32, "build.seed", self.seed, "in 0..2^32-1")
        for name in ("train_size", "val_size", "test_size"):
            _check(getattr(self, name) >= 1, f"build.{name}", getattr(self, name), ">= 1")
        for name in ("train_agreement", "eval_agreement"):
            v = getattr(self, name)
            _check(0.1 <= v <= 1.0, f"build.{name}", v, "in [0.1, 1] (0.1 = independent digit)")


# Prediction batch: activations of 256 images stay in a 2-core CPU's caches; with the folded bf16
# predictor it predicted ~5,800 images/s; autocast at 1024 ~2,600 (AMD EPYC, AVX-512 BF16, evidence.md).
EVAL_BATCH_SIZE = 256
FLIP_MODES = ("none", "patch", "image", "both")
INIT_MODES = ("default", "whiten")
# Model-selection criteria (`train.select`, the sweep's `--objective`) -> the val metric they maximise
# (declared in metrics.py). `worst_group` is the minimum over the 100 (class, digit) cells of the
# crossed val (every image rendered with each digit); `worst_class` uses no attribute at all
# (SubpopBench's rule when attributes are unknown).
SELECT_METRICS = {"val_acc": "acc", "worst_group": "worst_group_acc", "mean_group": "mean_group_acc",
                  "worst_class": "worst_class_acc", "conflicting": "conflicting_acc"}


@dataclass
class AugmentConfig:
    """Batched on-device augmentations (see `augment.py`); 0 turns one off."""

    flip: str = "patch"  # none | patch (the CIFAR patch alone) | image (whole canvas) | both
    flip_p: float = 0.5
    translate: int = 0  # max shift in pixels of the CIFAR patch (reflect-padded); level with 2 at 10 epochs
    noise_sigma: float = 0.0  # GaussianNoise after normalisation, unclipped
    erase_p: float = 0.0  # RandomErasing probability
    erase_scale_min: float = 0.02
    erase_scale_max: float = 0.2
    digit_shuffle_p: float = 1.0  # swap the digit patch with another image's in the batch

    def validate(self) -> None:
        _check(self.flip in FLIP_MODES, "augment.flip", self.flip, f"one of {FLIP_MODES}")
        for name in ("flip_p", "erase_p", "digit_shuffle_p"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"augment.{name}", v, "in [0, 1]")
        _check(0 <= self.translate <= 8, "augment.translate", self.translate, "in 0..8")
        _check(self.noise_sigma >= 0, "augment.noise_sigma", self.noise_sigma, ">= 0")
        _check(0 < self.erase_scale_min <= self.erase_scale_max <= 1,
               "augment.erase_scale_min/max", (self.erase_scale_min, self.erase_scale_max),
               "0 < min <= max <= 1")


@dataclass
class TrainConfig:
    """The defaults are `make all`'s recipe: ~80 % test in 11 epochs, about 12 minutes of fp32
    training on a 2-core CPU (the measurements behind each value: results/evidence.md)."""

    epochs: int = 11
    batch_size: int = 128  # faster per image than 256 on a 2-core CPU (activations stay in cache)
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # see schedules.py
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0 = off; else evaluate an exponential moving average of weights
    # Lookahead (lookahead.py): 0 = off; else the per-step decay of the slow weights (airbench: 0.95)
    lookahead: float = 0.0
    # Gradient clipping: 0 = off; else the largest global gradient norm (over every trained
    # parameter) a step applies, as torch.nn.utils.clip_grad_norm_ scales it. A step whose norm is
    # within the bound is left exactly as it was; the epochs' `clipped_steps` say when it acted.
    grad_clip: float = 0.0
    # conv1's starting weights: default (PyTorch's) | whiten (the training patches' principal
    # directions, both signs, scaled to unit variance; see whiten.py)
    init: str = "whiten"
    # Test-time augmentation (see evaluate.TTA): none | flip (CIFAR patch mirrored, 2 views) |
    # flip_shift (x shifts of the CIFAR patch by up to 1 px, 18 views). Per-epoch model selection
    # uses at most `flip`; the selected model is then evaluated with the full setting.
    tta: str = "flip_shift"
    method: str = "erm"  # a registered method (methods/); its hyperparameters are the [method] section
    # Model selection per epoch: val_acc | worst_group (worst (class, digit) cell of the crossed val) |
    # mean_group (mean over those cells) | worst_class | conflicting (digit-conflicting images only);
    # worst_group, mean_group and conflicting need digit labels on val.
    select: str = "val_acc"
    # What a group is (groups.py): class_digit = (class, digit), 100 groups, the field's definition;
    # aligned = (class, digit == label), 20 groups, an ablation that reproduces earlier tables.
    groups: str = "class_digit"
    pipeline: str = "fast"  # fast (tensors on the device) | reference (ImageFolder + DataLoader)
    subset: int = 0  # train on the first N training images (0 = all)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where the hardware has it) | bf16 | fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the training step's model (measured slower on 2 CPU cores)
    # CPU threads: 0 = one per CPU this process may run on (its affinity mask); parallel sweep
    # workers are each pinned to their share of the cores, so they split them instead of fighting.
    threads: int = 0
    eval_batch_size: int = EVAL_BATCH_SIZE
    # Score val (and select the model) every N epochs and after the last: each evaluation costs
    # about a tenth of an epoch's training on a CPU (flip views of 5,000 images).
    eval_every: int = 1
    # Model selection scores at most this many val images, a class-balanced subset that every run
    # shares (0 = all): the crossed val costs ten forward passes an image at every evaluation.
    val_images: int = 0
    num_workers: int = 2  # reference pipeline only

    def validate(self) -> None:
        _check(1 <= self.epochs <= 1000, "train.epochs", self.epochs, "in 1..1000")
        # Batch norm cannot train on one image (its variance is 0): every batch needs two or more.
        _check(2 <= self.batch_size <= 65536, "train.batch_size", self.batch_size, "in 2..65536 (batch norm needs two images)")
        _check(self.optimizer in ("sgd", "adamw"), "train.optimizer", self.optimizer, "sgd or adamw")
        _check(0 < self.lr <= 10, "train.lr", self.lr, "in (0, 10]")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        SCHEDULES.check(self.schedule)
        # Longer than the run is allowed (a shortened preset): the warm-up then covers the whole run.
        _check(0 <= self.warmup_epochs < math.inf, "train.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "in [0, 1)")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1)")
        _check(0 <= self.lookahead < 1, "train.lookahead", self.lookahead, "in [0, 1) (0 = off)")
        _check(0 <= self.grad_clip < math.inf, "train.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        _check(self.init in INIT_MODES, "train.init", self.init, f"one of {', '.join(INIT_MODES)}")
        METHODS.check(self.method)
        TTA.check(self.tta)
        _check(self.select in SELECT_METRICS, "train.select", self.select, f"one of {', '.join(SELECT_METRICS)}")
        GROUPINGS.check(self.groups)
        _check(self.pipeline in ("fast", "reference"), "train.pipeline", self.pipeline, "fast or reference")
        _check(self.subset >= 0, "train.subset", self.subset, ">= 0")
        _check(0 <= self.seed < 2**63, "train.seed", self.seed, "in 0..2^63-1")
        _check(self.precision in ("auto", "bf16", "fp32"), "train.precision", self.precision,
               "auto, bf16 or fp32")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               "train.device", self.device, "auto, cpu, cuda or cuda:N")
        _check(0 <= self.threads <= 1024, "train.threads", self.threads, "in 0..1024 (0 = the usable CPUs)")
        _check(self.eval_every >= 1, "train.eval_every", self.eval_every, ">= 1 (1 = every epoch)")
        _check(self.val_images >= 0, "train.val_images", self.val_images, ">= 0 (0 = all of val)")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.num_workers >= 0, "train.num_workers", self.num_workers, ">= 0")


@dataclass
class Config:
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The chosen method's own hyperparameters (`--set method.eta=0.01`), declared by the method
    # class with default and search range; `validate` checks them and fills in the defaults.
    method: dict[str, Any] = field(default_factory=dict)

    def method_params(self) -> dict[str, Param]:
        return METHODS[self.train.method].hparams

    def validate(self) -> Config:
        for name in _SECTIONS:
            getattr(self, name).validate()
        declared = self.method_params()
        for key in self.method:
            if key not in declared:
                raise UserError(f"unknown config key 'method.{key}': method {self.train.method} has "
                                f"{', '.join(declared) or 'no hyperparameters'}")
        self.method = {k: p.convert(f"method.{k}", self.method.get(k, p.default)) for k, p in declared.items()}
        return self

    def flat(self) -> dict[str, Any]:
        """`{"section.field": value}` for logging."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> Config:
        """The inverse of `flat` (e.g. a tracked run's MLflow params, all strings)."""
        cfg = cls()
        for key, value in flat.items():
            set_value(cfg, key, value)
        return cfg.validate()

    @classmethod
    def from_dict(cls, tree: dict[str, dict[str, Any]]) -> Config:
        if not isinstance(tree, dict):
            raise UserError(f"a run config must be a table of sections, not {type(tree).__name__}")
        cfg = cls()
        for section, values in tree.items():
            if section.startswith("_"):  # metadata beside the sections (a run's model hash)
                continue
            if not isinstance(values, dict):
                raise UserError(f"config entry {section!r} must be a [section] table")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value)
        return cfg.validate()

    def differences(self, other: Config) -> list[str]:
        """`key: ours -> theirs` for every value that differs."""
        a, b = self.flat(), other.flat()
        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _convert(value: Any, kind: type, name: str) -> Any:
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if kind is int:
                return int(float(text)) if float(text).is_integer() else int(text)
            value = kind(text)
        except (ValueError, OverflowError):
            raise UserError(f"bad config value {name}={value!r}: must be a {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"bad config value {name}={value!r}: must be a finite number")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"bad config value {name}={value!r}: must be a {kind.__name__}")
    return value


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.field` on `cfg`, converting strings to the field's type."""
    if dotted == "train.tta_flip":  # the boolean of earlier versions (saved run configs, MLflow params)
        dotted, value = "train.tta", "flip" if _convert(value, bool, dotted) else "none"
    section_name, _, key = dotted.partition(".")
    if section_name == "method" and key:  # checked against the method's declaration in validate()
        cfg.method[key] = value
        return
    section = getattr(cfg, section_name, None) if section_name in _SECTIONS else None
    if section is None or not key:
        raise UserError(f"unknown config key {dotted!r}: sections are {', '.join(_SECTIONS)}, method")
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise UserError(f"unknown config key {dotted!r}: {section_name} has {', '.join(hints)}")
    setattr(section, key, _convert(value, hints[key], dotted))


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "method")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> dict[str, dict[str, Any]]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"preset not found: {name_or_path} — choose one of {preset_names()} or give a .toml path")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"preset {path} is not valid TOML: {exc}") from None


def make_config(preset: str | None = None, sets: list[str] | None = None,
                base: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults, then `base` (e.g. a saved run's config), then a preset, then `--set` overrides."""
    cfg = Config()
    for tree in (base, load_preset(preset) if preset else None):
        for section, values in (tree or {}).items():
            if not isinstance(values, dict):
                raise UserError(f"preset entry {section!r} must be a [section] table")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value)
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: write it as section.field=value")
        set_value(cfg, key.strip(), value)
    return cfg.validate()


def fingerprint_differences(recorded: Any, current: Any) -> list[str]:
    """Where a recorded fingerprint (a study's, a results file's) and the current one differ, nested
    tables descended ("final/train.lr"). `current` is compared as it would read back from JSON
    (tuples as lists), the form every record is in. A config knob the record predates counts as
    holding its default: a knob is added with the default that keeps the old behaviour, so what was
    measured before it existed stays comparable (and a non-default value of it is a difference)."""
    return _differences(recorded, json.loads(json.dumps(current)), "")


def _differences(recorded: Any, current: Any, where: str) -> list[str]:
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return [] if recorded == current else [where or "value"]
    differs = []
    for key in sorted(set(recorded) | set(current)):
        name = f"{where}/{key}" if where else key
        if key not in recorded and _knob_defaults().get(key, _MISSING) == current[key]:
            continue
        if key not in recorded or key not in current:
            differs.append(name)
        else:
            differs += _differences(recorded[key], current[key], name)
    return differs


_MISSING = object()


def _knob_defaults() -> dict[str, Any]:
    """Every config knob's default, as it reads back from JSON (a fingerprint's form)."""
    return json.loads(json.dumps(Config().flat()))
