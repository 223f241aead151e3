"""The shortcut-strength study: methods x training agreement rate x digit size x seeds, one command.

A grid (a TOML file under `experiments/`) names the axes and one shared recipe. Every combination
is a *cell*: one training run on a dataset built for the cell's agreement rate and digit size
(cached under `data/` by a hash of its build configuration; val and test keep the digit independent
of the label). Cells are the trials of one Optuna study with a `GridSampler`, in the sweep's storage,
run by the sweep's worker loop (`trials.py`): several `compare` processes — on one host or many —
share the grid, a killed cell is failed by its heartbeat and run again, a finished cell never is.
Each cell is an MLflow child run under one parent run of the comparison.

A post-hoc method (DFR) in a grid that also trains ERM is not trained again: the ERM cell of the
same agreement, digit size and seed refits its model's last layer (`train.finish_trained`, DFR's
paper protocol on its base ERM model) and records that cell too.

Each finished cell also leaves a record in the grid's cell folder (`results/compare-cells/` beside
`results/compare/`; `parts.py`): its test metrics, losses, times, and the part and machine that ran
it. The tables are aggregated from those records, so a grid measured in parts (some seeds today,
the rest on another machine, `--part NAME`) merges into one table from the committed files; the
storage adds only which cells are running or failed. Per (method, agreement, digit size): mean,
standard deviation and a 95 % Student-t interval over seeds of every test metric of the metric
table (`metrics.py`); a cell that did not converge is named, never averaged in; cells not
finished are shown as missing, never as zero.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import statistics
import time
import tomllib
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import Config, fingerprint_differences, make_config
from .compare_results import cell_key, cell_table, seed_summary, strength_figures, strength_sentence, summary_markdown
from .errors import UserError, read_json, require_writable, write_text_atomic
from .outputs import replace_folder
from .parts import SHARED_BASE, default_part_name, losses_of, part_lines, read_records, refit_methods, write_record
from .metrics import METRICS
from .registry import METHODS
from .storage import DEFAULT_STORAGE, STUDIES, ClaimLock, file_lock, open_storage
from .tracking import init_tracking
from .trials import (WorkerSettings, claimed_params, creator_attr, ensure_parent_run, raised_since, run_shared_trials,
                     shared_study)

GRID_DIR = Path("experiments")
DEFAULT_GRID = GRID_DIR / "compare.toml"
AXES = ("methods", "agreements", "digit_sizes", "seeds")
# Config keys the axes set for every cell: a recipe may not set them too (it would be overridden).
AXIS_KEYS = {"train.method", "train.seed", "build.train_agreement", "geometry.digit_size", "geometry.digit_top",
             "geometry.digit_left"}
# A method entry "NAME+shuffle" adds digit-patch shuffle (the intervention that knows where the digit is).
SHUFFLE = "+shuffle"


@dataclass(frozen=True)
class Cell:
    method: str  # a registered method, optionally with "+shuffle"
    agreement: float
    digit_size: int
    seed: int

    @property
    def params(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        return f"{self.method} a={self.agreement:g} d={self.digit_size} seed={self.seed}"


@dataclass
class Grid:
    name: str = "strength"
    methods: tuple[str, ...] = ("erm", "erm+shuffle", "groupdro", "jtt")
    agreements: tuple[float, ...] = (0.1, 0.64, 0.9, 0.99)
    digit_sizes: tuple[int, ...] = (16, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    preset: str = "methods"
    recipe: dict[str, dict[str, Any]] = field(default_factory=dict)  # config sections over the preset
    sets: tuple[str, ...] = ()  # `--set section.field=value` over the recipe
    # A benchmark's chosen.json: each method trains with the setting the benchmark chose for it
    # (by worst-group val); "" = the recipe's values for every method.
    chosen: str = ""

    @property
    def cells(self) -> list[Cell]:
        """Every cell of the tables."""
        return [Cell(m, a, d, s) for m in self.methods for a in self.agreements for d in self.digit_sizes
                for s in self.seeds]

    @property
    def derived(self) -> tuple[str, ...]:
        """Method entries not trained on their own (`parts.refit_methods`): DFR refits the last
        layer of the same agreement, digit size and seed's ERM cell."""
        return refit_methods(self.methods)

    @property
    def trained_cells(self) -> list[Cell]:
        """The cells that are trials: one training run each (a derived cell comes with its base's)."""
        derived = self.derived
        return [c for c in self.cells if c.method not in derived]

    @property
    def cell_choices(self) -> dict[str, list[Any]]:
        """Each cell parameter's values, as the cell sampler draws them."""
        derived = self.derived
        return {"method": [m for m in self.methods if m not in derived], "agreement": list(self.agreements),
                "digit_size": list(self.digit_sizes), "seed": list(self.seeds)}

    def fingerprint(self) -> dict[str, Any]:
        """What makes two comparisons the same: the axes, the recipe a cell is trained with and the
        methods' chosen settings."""
        return {**{axis: list(getattr(self, axis)) for axis in AXES}, "recipe": self.base_config().flat(),
                "chosen": {m: self.method_sets(m) for m in self.methods}}

    def method_sets(self, entry: str) -> list[str]:
        """The `--set` items of a method's chosen setting (a `+shuffle` entry takes its method's, a
        refit entry its base's: the model it refits is trained with them)."""
        if not self.chosen:
            return []
        if entry in self.derived:
            entry = SHARED_BASE
        path = Path(self.chosen)
        if not path.is_file():
            raise UserError(f"grid chosen = {self.chosen!r}: no such file — run the benchmark first (`make benchmark`) "
                            "or drop `chosen` to train every method with the recipe's values")
        method, _ = _split_method(entry)
        tree = read_json(path, "benchmark choice", "rerun the benchmark or drop `chosen` from the grid")
        try:
            params = tree["chosen"][method]["worst_group"]["params"]
        except (KeyError, TypeError):
            raise UserError(f"{path} holds no worst-group choice for method {method} — benchmark it, or drop it "
                            "from the grid") from None
        return [f"{k}={v}" for k, v in sorted(params.items())]

    def recipe_sets(self) -> list[str]:
        """The recipe as `--set` items: over the preset, under the command line's."""
        items = [f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
                 for section, values in self.recipe.items() for key, value in values.items()]
        return items + list(self.sets)

    def base_config(self) -> Config:
        """The recipe every cell shares, less its method hyperparameters (`method.*`), which belong
        to each cell's method and are checked against it there."""
        return make_config(self.preset or None, [s for s in self.recipe_sets() if not s.startswith("method.")])

    def cell_config(self, cell: Cell) -> Config:
        base = self.base_config()
        method, shuffle = _split_method(cell.method)
        sets = [f"train.method={method}", f"train.seed={cell.seed}", f"build.train_agreement={cell.agreement}",
                *(f"geometry.{k}={getattr(base.geometry.with_corner_digit(cell.digit_size), k)}"
                  for k in ("digit_size", "digit_top", "digit_left"))]
        if shuffle:
            sets.append("augment.digit_shuffle_p=1.0")
        return make_config(self.preset or None, self.recipe_sets() + self.method_sets(cell.method) + sets)

    def validate(self) -> Grid:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise UserError(f"grid name {self.name!r}: use letters, digits, '-', '_' or '.'")
        for axis in AXES:
            values = getattr(self, axis)
            if not values:
                raise UserError(f"grid axis {axis} is empty: give at least one value")
            if len(set(values)) != len(values):
                raise UserError(f"grid axis {axis} repeats a value ({list(values)}): list each once")
        for entry in self.methods:
            method, _ = _split_method(entry)
            if method not in METHODS:
                raise UserError(f"unknown method {entry!r} in the grid: choose among {', '.join(METHODS.names())} "
                                f"(add '{SHUFFLE}' for digit shuffle)")
        for a in self.agreements:
            if not 0.1 <= a <= 1.0:
                raise UserError(f"grid agreement {a} is outside [0.1, 1]: 0.1 = no shortcut (the digit is "
                                "independent of the label), 1 = the digit always agrees")
        base = self.base_config()
        geom = base.geometry
        room = geom.canvas - max(geom.cifar_top + geom.cifar_size, geom.cifar_left + geom.cifar_size)
        for d in self.digit_sizes:
            if not 4 <= d <= room:
                raise UserError(f"grid digit size {d} does not fit the {geom.canvas}px canvas beside the "
                                f"{geom.cifar_size}px CIFAR image: use 4..{room}")
        for s in self.seeds:
            if s < 0:
                raise UserError(f"grid seed {s}: seeds are integers >= 0")
        taken = sorted({s.partition("=")[0].strip() for s in self.recipe_sets()} & AXIS_KEYS)
        if taken:
            raise UserError(f"the grid's recipe sets {', '.join(taken)}, which its axes decide for every cell — drop "
                            "it from the recipe and give the value as an axis (methods, agreements, digit_sizes, seeds)")
        for cell in self.cells:
            try:
                self.cell_config(cell)  # a bad recipe value fails here, before any cell
            except UserError as exc:
                raise UserError(f"grid cell {cell.label}: {exc}") from None
        return self


def _split_method(entry: str) -> tuple[str, bool]:
    return (entry[: -len(SHUFFLE)], True) if entry.endswith(SHUFFLE) else (entry, False)


def _axis(name: str, value: Any, kind: type) -> tuple[Any, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise UserError(f"grid axis {name} must be a list, e.g. {name} = [{'1, 2' if kind is not str else chr(34) + 'erm' + chr(34)}]")
    out = []
    for item in items:
        try:
            if kind is str:
                if not isinstance(item, str):
                    raise ValueError
                out.append(item.strip())
            elif kind is int:
                if isinstance(item, bool) or float(item) != int(float(item)):
                    raise ValueError
                out.append(int(float(item)))
            else:
                if isinstance(item, bool):
                    raise ValueError
                out.append(float(item))
        except (TypeError, ValueError):
            raise UserError(f"grid axis {name}: {item!r} is not a{'n' if kind is int else ''} "
                            f"{kind.__name__}") from None
    return tuple(out)


AXIS_TYPES = {"methods": str, "agreements": float, "digit_sizes": int, "seeds": int}


def load_grid(path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> Grid:
    """The grid file (default `experiments/compare.toml`) with `--set` overrides: an axis or the
    name (`--set seeds=0,1`, `--set name=mine`) or a recipe value (`--set train.epochs=2`)."""
    path = Path(path) if path else DEFAULT_GRID
    if not path.suffix and not path.exists():
        path = GRID_DIR / f"{path}.toml"
    if not path.is_file():
        raise UserError(f"grid file not found: {path} — give --grid FILE.toml (see experiments/compare.toml)")
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"grid file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read grid file {path}: {exc}") from None
    grid = Grid()
    for key, value in tree.items():
        if key in AXIS_TYPES:
            setattr(grid, key, _axis(key, value, AXIS_TYPES[key]))
        elif key in ("name", "preset", "chosen"):
            if not isinstance(value, str):
                raise UserError(f"grid {key} in {path} must be a string")
            setattr(grid, key, value)
        elif key == "recipe":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise UserError(f"grid recipe in {path} must hold [recipe.SECTION] tables, e.g. [recipe.train]")
            grid.recipe = value
        else:
            raise UserError(f"unknown key {key!r} in grid file {path}: keys are name, preset, chosen, "
                            f"{', '.join(AXES)} and [recipe.SECTION] tables")
    recipe_sets = []
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"--set {item!r}: write it as KEY=VALUE (an axis: {', '.join(AXES)}; or section.field)")
        if key in AXIS_TYPES:
            setattr(grid, key, _axis(key, value, AXIS_TYPES[key]))
        elif key in ("name", "preset", "chosen"):
            setattr(grid, key, value.strip())
        else:
            recipe_sets.append(item)
    grid.sets = tuple(recipe_sets)
    return grid.validate()


# ---- datasets, one per distinct (build, geometry) ----------------------------------------------------

def _source_identity(src: str | Path) -> str:
    """A source archive by its content (not its path or time: a copy of the same archive made
    anew, as each session's shared folder is, keeps the datasets built from it)."""
    p = Path(src)
    if p.is_file():
        st = p.stat()
        return _archive_digest(p.resolve(), st.st_size, st.st_mtime_ns)
    return str(p.resolve()) if p.exists() else str(src)


@functools.lru_cache(maxsize=None)
def _archive_digest(path: Path, size: int, mtime_ns: int) -> str:
    """The archive's SHA-256, read once per process (every cell asks); size and time in the key
    read it again after a change."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dataset_dir(cfg: Config, sources: tuple[str, str], root: Path) -> Path:
    """Where the dataset a cell trains on lives: `root/strength-HASH`, HASH over the build and
    geometry configuration and the two sources."""
    key = {"build": asdict(cfg.build), "geometry": asdict(cfg.geometry),
           "sources": [_source_identity(s) for s in sources]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"strength-{digest}"


def ensure_dataset(cfg: Config, sources: tuple[str, str], root: Path, download: bool = False) -> Path:
    """The cell's dataset, built once (under a lock: processes on one host wait for one build)."""
    from .data.composite import build_dataset

    out = dataset_dir(cfg, sources, root)
    if (out / "metadata.csv").is_file():
        return out
    with file_lock(root / f".{out.name}.lock"):
        if not (out / "metadata.csv").is_file():
            print(f"building {out} (agreement {cfg.build.train_agreement:g}, digit {cfg.geometry.digit_size} px)",
                  flush=True)
            build_dataset(sources[0], sources[1], out, cfg.build, cfg.geometry, download=download, quiet=True)
            write_text_atomic(out.with_suffix(".json"), json.dumps(
                {"build": asdict(cfg.build), "geometry": asdict(cfg.geometry), "sources": list(sources)}, indent=2))
    return out


# ---- running the grid ----------------------------------------------------------------------------------

@dataclass
class CompareOptions:
    grid: Grid
    cifar: str
    mnist: str
    download: bool = False
    data_root: Path = Path("data")
    storage: str | None = None
    tracking_uri: str | None = None
    out: Path = Path("results") / "compare"
    timeout: float | None = None
    heartbeat: int = 30
    grace: int = 90
    part: str = ""  # what this command measures (default: the host and the date)

    @property
    def part_name(self) -> str:
        return self.part or default_part_name()

    @property
    def cells_dir(self) -> Path:
        return cells_dir(self.out)

    @property
    def study(self) -> str:
        """The grid's Optuna study, one per set of seeds: parts that split the seeds (`--set seeds=1`)
        share a storage without sharing a GridSampler's grid."""
        return f"compare-{self.grid.name}-seeds-{'-'.join(map(str, self.grid.seeds))}"

    @property
    def experiment(self) -> str:
        """The grid's MLflow experiment: every part's parent run and cells in one place."""
        return f"compare-{self.grid.name}"


def open_comparison(opts: CompareOptions, create: bool = True) -> optuna.Study | None:
    """The comparison's study, made by the first process (with `create=False`, None when the storage
    has none); refused if the storage holds a comparison of this name with another grid."""
    storage = open_storage(opts.storage)
    fingerprint = opts.grid.fingerprint()
    # One seed for every process: the sampler shuffles the grid by it, and a trial's grid id must
    # name the same cell in every process.
    sampler = CellSampler(opts.grid.cell_choices, seed=0)
    where = opts.storage or DEFAULT_STORAGE
    if not create:
        try:
            study = optuna.load_study(study_name=opts.study, storage=storage, sampler=sampler)
        except KeyError:
            return None
        differs = fingerprint_differences(creator_attr(study, "grid") or {}, fingerprint)
    else:
        study, differs = shared_study(storage, opts.study, "grid", fingerprint, sampler=sampler)
    if differs:
        raise UserError(f"{where} already holds comparison {opts.grid.name!r} with another grid (differs in "
                        f"{', '.join(differs)[:200]}) — give it another name (--set name=…) or use the same grid")
    return study


def cells_dir(out: Path) -> Path:
    """Where a grid's cell records live: beside its tables (`results/compare` -> `results/compare-cells`),
    not inside, because the tables' folder is replaced whole on every aggregation."""
    return out.with_name(f"{out.name}-cells")


GRID_FILE = "grid.json"  # in the cell folder: what its records were measured for


def check_cells_dir(opts: CompareOptions, create: bool) -> None:
    """The cell folder holds records of this grid only: its `grid.json` (the grid's fingerprint
    less the seeds, which parts split) is written by the first part and must match in every later
    one, so records of another recipe or choice are never merged into one table."""
    path = opts.cells_dir / GRID_FILE
    ours = {k: v for k, v in opts.grid.fingerprint().items() if k != "seeds"}
    if path.is_file():
        differs = fingerprint_differences(read_json(path, "comparison cell folder", f"remove {opts.cells_dir}"), ours)
        if differs:
            raise UserError(f"{opts.cells_dir} holds cells of another grid (differs in {', '.join(differs)[:200]}) — "
                            "give another --out or use the same grid")
    elif create:
        require_writable(opts.cells_dir, "folder")
        write_text_atomic(path, json.dumps(ours, indent=2, sort_keys=True) + "\n")


def cell_file(out: Path, cell: Cell) -> Path:
    return cells_dir(out) / f"{cell.method}__a{cell.agreement:g}__d{cell.digit_size}__seed{cell.seed}.json"


def _cell_of(params: dict[str, Any]) -> Cell | None:
    key = cell_key(params)
    return Cell(*key) if key else None


class CellSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, less its stop at the grid's end: `Study.stop` is only valid inside
    `study.optimize`, and our ask/tell worker loop (`next_cell`) knows when the grid is done."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        pass


def recorded_cells(out: Path) -> set[Cell]:
    """The cells some part has finished: their records are in the cell folder."""
    return {c for p in sorted(cells_dir(out).glob("*__seed*.json")) if (c := _cell_of(_record_key(p)))}


def _record_key(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: not finished (the aggregation names it)


def next_cell(study: optuna.Study, grid: Grid, since: float = 0.0,
              recorded: AbstractSet[Cell] = frozenset()) -> optuna.Trial | None:
    """The next cell to run (called with the claim held), or None when every cell is finished or
    running: a cell no trial has had yet, picked by the GridSampler (or, when another part finished
    cells this storage never saw, `recorded`, the first cell left); else a cell whose trial failed,
    enqueued again — a killed worker's (its heartbeat went silent) always, one whose run raised only
    if it raised before `since` (this command's start: a deterministic error is not retried in a
    loop; the next command retries it once, after a fix)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return study.ask()  # an enqueued cell whose process died before asking for it
    taken = {_cell_of(claimed_params(t)) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)}
    raised = {_cell_of(claimed_params(t)) for t in trials if raised_since(t, since)}
    recorded = recorded & set(grid.trained_cells)
    missing = [c for c in grid.trained_cells if c not in taken and c not in raised and c not in recorded]
    if not missing:
        return None
    # What the GridSampler counts as visited: grid ids of finished or running trials. While any
    # grid id is left, it picks one of those; never a cell another worker runs, but it knows
    # nothing of the cells other parts recorded.
    visited = {t.system_attrs.get("grid_id") for t in trials if t.state.is_finished() or t.state == TrialState.RUNNING}
    if len(visited - {None}) < len(grid.trained_cells) and not (recorded - taken):
        return study.ask()
    study.enqueue_trial(missing[0].params, skip_if_exists=False)
    return study.ask()


def _cell_runner(opts: CompareOptions, experiment_id: str, parent: str):
    import mlflow

    from .bench import machine_line
    from .data.layout import cell_counts
    from .diagnostics import score_model
    from .evaluate import confusion
    from .tracking import device_tag, git_commit, log_confusion, log_epoch, tracked_trial
    from .train import fit

    space = opts.grid.cell_choices
    machine = machine_line()

    def run_cell(trial: optuna.Trial) -> float:
        cell = Cell(**{axis: trial.suggest_categorical(axis, choices) for axis, choices in space.items()})
        cfg = opts.grid.cell_config(cell)
        data = ensure_dataset(cfg, (opts.cifar, opts.mnist), opts.data_root, opts.download)
        run_dir = STUDIES / opts.study / f"cell-{trial.number:04d}"
        tags = {"study": opts.study, "trial": str(trial.number), "role": "cell", "part": opts.part_name,
                "git_commit": git_commit(),
                "device": device_tag(), **{f"cell.{k}": str(v) for k, v in cell.params.items()}}
        started, started_at = time.monotonic(), time.time()
        with tracked_trial(experiment_id, parent, cell.label, tags,
                           lambda run_id: trial.set_user_attr("mlflow_run_id", run_id)):
            mlflow.log_params({**cfg.flat(), **{f"cell.{k}": v for k, v in cell.params.items()},
                               "trial_number": trial.number, "data": str(data)})
            result = fit(cfg, data, run_dir, on_epoch=lambda epoch, record: log_epoch(record), quiet=True)
            scores, preds, labels = score_model(result.model, cfg, data)
            if not scores:  # inside: a cell that cannot be scored is failed like one whose run raised
                raise UserError(f"{data}/test has no labels: the comparison scores cells on the labelled test split")
            seconds = time.monotonic() - started
            scores = {k: v for k, v in scores.items() if k in METRICS}
            counts = cell_counts(data, "train")
            common = {"train_seconds": result.train_seconds, **losses_of(result.history), "epoch": result.best_epoch,
                      "rarest_cell": int(counts.min()) if counts is not None else None, "epochs": cfg.train.epochs,
                      "data": data.name, "part": opts.part_name, "machine": machine, "commit": git_commit()}
            if cell.method == SHARED_BASE:  # first the refits of this model (a killed cell redoes both)
                for entry in opts.grid.derived:
                    _refit_cell(opts, Cell(entry, cell.agreement, cell.digit_size, cell.seed), result.model, data,
                                {**common, "shared_run": cell.label})
            write_record(cell_file(opts.out, cell), {**cell.params, **common, "test": scores, "seconds": seconds,
                                                     "started": started_at, "ended": time.time()})
            mlflow.log_metrics({f"test_{k}": v for k, v in scores.items() if math.isfinite(v)}
                               | {"cell_seconds": seconds, "total_train_seconds": result.train_seconds,
                                  "median_images_per_s": result.images_per_s})
            log_confusion(confusion(preds, labels), "test_confusion")
            for key, value in scores.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("seconds", seconds)
            return float(scores["acc"])

    return run_cell


def _refit_cell(opts: CompareOptions, cell: Cell, model: Any, data: Path, common: dict[str, Any]) -> None:
    """A derived cell (a post-hoc method on the ERM cell's model): refit, scored, recorded; its
    training fields are the ERM cell's, `seconds` the refit's and scoring's own."""
    from .diagnostics import score_refit

    started, started_at = time.monotonic(), time.time()
    scores = score_refit(model, opts.grid.cell_config(cell), data)
    write_record(cell_file(opts.out, cell), {**cell.params, **common, "train_seconds": 0.0, "test": scores,
                                             "seconds": time.monotonic() - started, "started": started_at,
                                             "ended": time.time()})


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


def progress_line(study: optuna.Study, grid: Grid, frozen: optuna.trial.FrozenTrial) -> str:
    """One line per finished cell, with the cells left and an estimate of the time to finish."""
    cell = _cell_of(frozen.params)
    label = cell.label if cell else f"trial {frozen.number}"
    trials = study.get_trials(deepcopy=False)
    done = {_cell_of(t.params) for t in trials if t.state == TrialState.COMPLETE}
    left = len([c for c in grid.trained_cells if c not in done])
    running = sum(t.state == TrialState.RUNNING for t in trials)
    times = [t.user_attrs["seconds"] for t in trials if t.state == TrialState.COMPLETE and "seconds" in t.user_attrs]
    eta = left * statistics.median(times) / max(1, running + 1) if times else math.nan
    if frozen.state == TrialState.COMPLETE:
        ua = frozen.user_attrs
        what = f"test {ua.get('acc', math.nan):.2f} %, conflicting {ua.get('conflicting_acc', math.nan):.2f} %"
    else:
        what = frozen.state.name.lower()
    secs = frozen.user_attrs.get("seconds")
    if secs is None and frozen.datetime_complete and frozen.datetime_start:
        secs = (frozen.datetime_complete - frozen.datetime_start).total_seconds()
    total = len(grid.trained_cells)
    return (f"cell {label}: {what} ({secs or math.nan:.0f} s) — {total - left}/{total} done, "
            f"{left} left" + (f", about {_duration(eta)} to go" if left else ""))


def write_results(grid: Grid, out: Path, study: optuna.Study | None = None, parent: str | None = None) -> str:
    """cells.csv, summary.csv, summary.md and the three plots into `out`, from the cell records
    (every part that left them; `study`, when there is one, adds the running and failed cells),
    replaced as one unit (a failure, a full disk included, leaves the earlier set whole), also logged
    to the parent run; returns the Markdown table."""
    import matplotlib.pyplot as plt

    out = require_writable(out, "folder")
    in_grid = set(grid.cells)
    records = [r for r in read_records(cells_dir(out), "comparison cell", "*__seed*.json") if _cell_of(r) in in_grid]
    trials = study.get_trials(deepcopy=False) if study is not None else []
    cells = cell_table(records, trials, [c.params for c in grid.cells])
    summary = seed_summary(cells, len(grid.seeds))
    table = summary_markdown(summary, cells, min(grid.agreements))
    recipe = ", ".join(f"{k}={v}" for k, v in grid.base_config().flat().items()
                       if k.startswith(("train.", "augment.")) and k not in ("train.method", "train.seed"))
    names = ["cells.csv", "summary.csv", "summary.md"]
    with replace_folder(out) as stage:
        cells.to_csv(stage / "cells.csv", index=False)
        summary.to_csv(stage / "summary.csv", index=False)
        (stage / "summary.md").write_text("\n".join([
            f"# Comparison `{grid.name}`", "", strength_sentence(summary), "",
            f"Methods {', '.join(grid.methods)}; agreement {', '.join(map(str, grid.agreements))}; digit "
            f"{', '.join(map(str, grid.digit_sizes))} px; seeds {', '.join(map(str, grid.seeds))}.", "",
            f"Recipe (preset `{grid.preset}`): {recipe}", "", table, "",
            f"Parts (the cell records in `{cells_dir(out)}`):", *part_lines(records, "cells"), ""]))
        for name, fig in strength_figures(summary).items():
            fig.savefig(stage / f"{name}.png", dpi=120, format="png")
            plt.close(fig)
            names.append(f"{name}.png")
    if parent:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for name in names:
            client.log_artifact(parent, str(out / name))
        done = int((cells["state"] == "complete").sum())
        client.log_metric(parent, "cells_done", done, step=done)
    return table


def compare(opts: CompareOptions) -> str:
    """Run (or join, or resume) the comparison until every cell is finished or `timeout` passes;
    then aggregate what is finished into `opts.out`."""
    for what, src in (("--cifar", opts.cifar), ("--mnist", opts.mnist)):
        if not opts.download and not Path(src).exists():
            raise UserError(f"{what} {src} not found — give the CIFAR-10 / MNIST archive or folder, or --download")
    for name, value, low in (("--heartbeat", opts.heartbeat, 1), ("--grace", opts.grace, opts.heartbeat + 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low} (got {value})")
    if opts.timeout is not None and opts.timeout < 0:
        raise UserError(f"--timeout must be >= 0 seconds, 0 = none (got {opts.timeout})")
    require_writable(opts.out, "folder")
    require_writable(opts.data_root, "folder")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_cells_dir(opts, create=False)  # before the storage: a grid refused here leaves no study behind
    study = open_comparison(opts)
    check_cells_dir(opts, create=True)  # and the grid's record only once the storage took it
    experiment_id = init_tracking(opts.tracking_uri, opts.experiment)
    claim = ClaimLock(opts.storage or DEFAULT_STORAGE, opts.study)
    claim.acquire()  # processes starting together: one makes the parent run, the others find it
    try:
        grid = opts.grid
        parent = ensure_parent_run(study, experiment_id, f"compare {grid.name}", {"study": opts.study, "role": "comparison"},
                                   {"methods": ",".join(grid.methods), "agreements": ",".join(map(str, grid.agreements)),
                                    "digit_sizes": ",".join(map(str, grid.digit_sizes)),
                                    "seeds": ",".join(map(str, grid.seeds)), "preset": grid.preset,
                                    "cells": len(grid.cells),
                                    **{k: v for k, v in grid.base_config().flat().items()
                                       if k.startswith(("train.", "augment."))}})
    finally:
        claim.release()
    derived = f" ({', '.join(opts.grid.derived)} refit from the {SHARED_BASE} cells' models)" if opts.grid.derived else ""
    print(f"comparison {opts.grid.name}: {len(opts.grid.trained_cells)} cells to train in {opts.storage or DEFAULT_STORAGE}"
          f"{derived}", flush=True)
    deadline = time.monotonic() + opts.timeout if opts.timeout else math.inf
    since = time.time()
    try:
        run_shared_trials(study, claim, lambda s: next_cell(s, opts.grid, since, recorded_cells(opts.out)), _cell_runner(opts, experiment_id, parent),
                          WorkerSettings(experiment_id=experiment_id, heartbeat=opts.heartbeat, grace=opts.grace,
                                         deadline=deadline, storage=opts.storage or DEFAULT_STORAGE,
                                         retry=False),  # a failed cell is enqueued again by next_cell
                          lambda frozen: print(progress_line(study, opts.grid, frozen), flush=True))
    finally:  # what finished is written even when the worker stops on failures
        table = write_results(opts.grid, opts.out, study, parent)
    failed = failed_cells(study, opts.grid, since)
    if failed:
        raise UserError(f"{len(failed)} cell(s) failed, e.g. {failed[0]}; {opts.out}/summary.md shows them "
                        "missing — fix the cause and run the command again to retry them")
    return table


def failed_cells(study: optuna.Study, grid: Grid, since: float) -> list[str]:
    """`cell: error` for each cell not finished whose run raised since `since`."""
    done = {_cell_of(t.params) for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE}
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        cell = _cell_of(t.params)
        if cell and cell not in done and raised_since(t, since):
            out[cell] = f"{cell.label}: {t.user_attrs['error']}"
    return list(out.values())


def aggregate(opts: CompareOptions) -> str:
    """Tables and plots of what is finished so far, without running a cell: from the cell records
    (the committed parts), with the storage's running and failed cells when it holds the grid."""
    study = open_comparison(opts, create=False)  # None: the parts' records alone (another machine's storage)
    if study is None and not (opts.cells_dir / GRID_FILE).is_file():
        raise UserError(f"no comparison {opts.grid.name!r}: neither {opts.storage or DEFAULT_STORAGE} nor "
                        f"{opts.cells_dir} holds it — run `make compare` first")
    check_cells_dir(opts, create=False)
    parent = study.user_attrs.get("mlflow_parent_run_id") if study is not None else None
    if parent:
        init_tracking(opts.tracking_uri, opts.experiment)
    return write_results(opts.grid, opts.out, study, parent)
