"""`benchmark`: every method tuned alike, then several seeds of each method's chosen setting.

The protocol is SubpopBench's (and BalancingGroups', DomainBed's): for each method the same number
of hyperparameter *settings* — setting 0 the defaults, the others drawn at random from the method's
declared search ranges plus the shared learning rate and weight decay (Optuna's `RandomSampler`,
seeded by the benchmark and method name, so every process and host draws the same settings) — each
one training run on the *search* recipe, its epochs selected by worst-group val. The setting with
the best worst-group val is the method's choice; beside it, the attribute-free rule picks by
worst-class val. Then each (method, rule)'s chosen setting trains with every seed on the *final*
recipe and is scored on the test set; the table gives every metric of `metrics.METRICS` as mean ±
95 % interval over seeds. Rules that chose the same setting share one seed run, each rule taking
the epoch it selects in it (`train.fit(also_select=...)`). ERM + digit shuffle (ERM's choice, plus the intervention that knows where
the digit is) is a labelled reference row, not a competitor. A post-hoc method beside ERM (DFR,
`parts.refit_methods`) is neither searched nor trained: as in its paper, its base is the ERM model —
each ERM seed run's selected model, its last layer refit (DFR tunes its own C on half of val), so
its row costs a refit per ERM seed run, not a search and seed runs of another ERM.

Each method's settings are one Optuna study (`benchmark-NAME-METHOD`) and the seed runs another
(`benchmark-NAME-seeds`), in the sweep's storage and run by the sweep's worker loop (`trials.py`):
several processes on one host or many share them, a killed worker's trial is failed by its
heartbeat and run again, a finished one never is; each trial is an MLflow child run of the
benchmark's parent run.

**Measured in parts.** What a benchmark has measured lives in its output folder too, as files meant
to be committed: `chosen.json` (the settings and each method's choice) and `runs/*.json` (one per
finished seed run: its test metrics, the part it belongs to, the machine line, the commit). A part —
some seeds today (`--seeds 0`), the rest another day or on another machine (`--seeds 1,2`, a storage
of its own) — reuses `chosen.json` instead of searching again; the table is aggregated from the run
files alone and says which parts it holds and where each ran.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import SELECT_METRICS, Config, Param, fingerprint_differences, make_config
from .errors import UserError, atomic_path, read_json, require_writable, write_text_atomic
from .metrics import METRICS, seed_interval
from .parts import (DEFECT_RULE, SHARED_BASE, default_part_name, losses_of, not_converged, part_lines, read_records,
                    refit_methods, write_record)
from .registry import METHODS
from .storage import DEFAULT_STORAGE, STUDIES, ClaimLock, open_storage
from .study import SEARCH_SPACE
from .trials import WorkerSettings, ensure_parent_run, next_listed, run_shared_trials, shared_study

# Every method's shared dimensions, as the sweep declares them.
SHARED_SPACE: dict[str, Param] = {k: SEARCH_SPACE[k] for k in ("train.lr", "train.weight_decay")}
RULES = ("worst_group", "worst_class")  # model-selection rules (`train.select`): with and without attributes
SHUFFLE = "+shuffle"
DEFAULT_SPEC = Path("experiments") / "benchmark.toml"
KEYS = ("name", "methods", "reference", "settings", "seeds", "rules", "preset", "search", "final")


@dataclass
class BenchmarkSpec:
    name: str = "benchmark"
    methods: tuple[str, ...] = ("erm", "reweight", "resample", "groupdro", "jtt", "lff", "dfr")
    reference: tuple[str, ...] = ("erm+shuffle",)  # ERM's choice + digit shuffle: reported, not tuned
    settings: int = 4  # hyperparameter settings per method (the same budget for every method)
    seeds: tuple[int, ...] = (0, 1, 2)
    rules: tuple[str, ...] = RULES
    preset: str = "final"
    search: dict[str, dict[str, Any]] = field(default_factory=dict)  # [search.SECTION] over the preset
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # [final.SECTION] over the preset
    sets: tuple[str, ...] = ()  # --set section.field=value over both recipes

    # ---- configs ----
    def _sets(self, tables: dict[str, dict[str, Any]]) -> list[str]:
        return [f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
                for section, values in tables.items() for key, value in values.items()] + list(self.sets)

    def search_config(self, method: str, params: dict[str, Any], seed: int) -> Config:
        return make_config(self.preset, self._sets(self.search) + [
            f"train.method={method}", "train.select=worst_group", f"train.seed={seed}",
            *(f"{k}={v}" for k, v in params.items())])

    def final_config(self, row: str, rule: str, params: dict[str, Any], seed: int) -> Config:
        method, shuffle = (row[: -len(SHUFFLE)], True) if row.endswith(SHUFFLE) else (row, False)
        return make_config(self.preset, self._sets(self.final) + [
            f"train.method={method}", f"train.select={rule}", f"train.seed={seed}",
            *(f"{k}={v}" for k, v in params.items()), *(["augment.digit_shuffle_p=1.0"] if shuffle else [])])

    # ---- the settings ----
    def space(self, method: str) -> dict[str, Param]:
        own = {f"method.{k}": p for k, p in METHODS[method].hparams.items() if p.search}
        return {**SHARED_SPACE, **own}

    def settings_of(self, method: str) -> list[dict[str, Any]]:
        """The method's settings: 0 the defaults of the search recipe, the rest drawn by a seeded
        RandomSampler from `space(method)` — the same list in every process."""
        space = self.space(method)
        base = make_config(self.preset, self._sets(self.search) + [f"train.method={method}"]).flat()
        settings = [{k: base[k] for k in space}]
        sampler = optuna.samplers.RandomSampler(seed=zlib.crc32(f"{self.name}:{method}".encode()))
        previous = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the draws' in-memory study is bookkeeping
        try:
            draws = optuna.create_study(sampler=sampler)
        finally:
            optuna.logging.set_verbosity(previous)
        for _ in range(self.settings - 1):
            trial = draws.ask()
            settings.append({k: p.suggest(trial, k) for k, p in space.items()})
        return settings

    def rows(self) -> tuple[str, ...]:
        return self.methods + self.reference

    @property
    def refits(self) -> tuple[str, ...]:
        """Methods neither searched nor trained: DFR refits each ERM seed run's selected model (its
        paper's base model, ERM's hyperparameters; its own C tuned inside the refit on half of val)."""
        return refit_methods(self.methods)

    @property
    def searched(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m not in self.refits)

    def trained_rows(self) -> list[str]:
        """The rows that are seed runs (a refit row's records come with its base's runs)."""
        return [r for r in self.rows() if r not in self.refits]

    def fingerprint(self) -> dict[str, Any]:
        """What makes two benchmarks the same (seeds excluded: they are what parts split)."""
        return {"methods": list(self.methods), "reference": list(self.reference), "settings": self.settings,
                "refits": list(self.refits), "rules": list(self.rules), "search": self.search_config(self.methods[0], {}, 0).flat(),
                "final": self.final_config(self.methods[0], self.rules[0], {}, 0).flat()}

    def validate(self) -> BenchmarkSpec:
        """Every value and every run's config checked before any work."""
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise UserError(f"benchmark name {self.name!r}: use letters, digits, '-', '_' or '.'")
        if not isinstance(self.settings, int) or isinstance(self.settings, bool) or not 1 <= self.settings <= 1000:
            raise UserError(f"benchmark settings={self.settings!r}: give the number of settings per method, 1..1000")
        if not self.methods:
            raise UserError("benchmark methods is empty: give at least one method")
        for name in self.methods:
            METHODS[name]  # an unknown method is a one-line error naming the choices
        for row in self.reference:
            if not row.endswith(SHUFFLE) or row[: -len(SHUFFLE)] not in self.methods:
                raise UserError(f"benchmark reference {row!r}: a reference row is METHOD{SHUFFLE} of a benchmarked method")
        for rule in self.rules:
            if rule not in SELECT_METRICS:
                raise UserError(f"benchmark rule {rule!r}: choose among {', '.join(SELECT_METRICS)}")
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"benchmark seeds {list(self.seeds)}: give distinct integers >= 0")
        for name in self.methods:
            for params in self.settings_of(name):
                self.search_config(name, params, 0)
        for row in self.rows():
            for rule in self.rules:
                self.final_config(row, rule, {}, self.seeds[0])
        return self


def _tuple(key: str, value: Any, kind: type) -> tuple[Any, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items):
        raise UserError(f"benchmark {key} must be a list, e.g. {key} = [\"erm\", \"jtt\"] or [0, 1, 2]")
    try:
        return tuple(kind(str(i).strip()) for i in items if str(i).strip())
    except ValueError:
        raise UserError(f"benchmark {key}: {value!r} is not a list of {kind.__name__}s") from None


def _set_key(spec: BenchmarkSpec, key: str, value: Any, where: str) -> None:
    if key in ("methods", "reference", "rules"):
        spec.__dict__[key] = _tuple(key, value, str)
    elif key == "seeds":
        spec.seeds = _tuple(key, value, int)
    elif key == "settings":
        try:
            spec.settings = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else value
        except (TypeError, ValueError):
            raise UserError(f"benchmark settings={value!r}: give the number of settings per method, 1..1000") from None
    elif key in ("name", "preset"):
        if not isinstance(value, str):
            raise UserError(f"benchmark {key} in {where} must be a string")
        spec.__dict__[key] = value.strip()
    elif key in ("search", "final"):
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise UserError(f"benchmark {key} in {where} must hold [{key}.SECTION] tables, e.g. [{key}.train]")
        spec.__dict__[key] = value
    else:
        raise UserError(f"unknown key {key!r} in {where}: keys are {', '.join(KEYS)}")


def load_spec(path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> BenchmarkSpec:
    """The benchmark file (default `experiments/benchmark.toml`) with `--set` overrides: a key of
    the file (`--set seeds=0`, `--set settings=2`) or a value of both recipes (`--set train.lr=0.1`)."""
    path = Path(path) if path else DEFAULT_SPEC
    if not path.suffix and not path.exists():
        path = DEFAULT_SPEC.parent / f"{path}.toml"
    if not path.is_file():
        raise UserError(f"benchmark file not found: {path} — give --spec FILE.toml (see {DEFAULT_SPEC})")
    try:
        tree = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read benchmark file {path}: {exc}") from None
    spec = BenchmarkSpec()
    for key, value in tree.items():
        _set_key(spec, key, value, str(path))
    recipe = []
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: write it as KEY=VALUE (a benchmark key: {', '.join(KEYS[:7])}; or section.field)")
        if key.strip() in KEYS[:7]:
            _set_key(spec, key.strip(), value, "--set")
        else:
            recipe.append(item)
    spec.sets = tuple(recipe)
    return spec.validate()


# ---- the studies -----------------------------------------------------------------------------------------

@dataclass
class BenchmarkOptions:
    spec: BenchmarkSpec
    data: Path
    storage: str | None = None
    tracking_uri: str | None = None
    out: Path = Path("results") / "benchmark"
    part: str = ""  # a name for what this command measures (default: host and date)
    timeout: float | None = None
    heartbeat: int = 30
    grace: int = 90

    def study_name(self, what: str) -> str:
        return f"benchmark-{self.spec.name}-{what}"

    @property
    def part_name(self) -> str:
        return self.part or default_part_name()


def _open(opts: BenchmarkOptions, what: str) -> optuna.Study:
    """A study of the benchmark, made by the first process; refused if the storage holds one of
    this name made for another benchmark (methods, settings, rules or recipes)."""
    study, differs = shared_study(open_storage(opts.storage), opts.study_name(what), "benchmark", opts.spec.fingerprint())
    if differs:
        raise UserError(f"{opts.storage or DEFAULT_STORAGE} already holds benchmark {opts.spec.name!r} with another "
                        f"budget or recipe (differs in {', '.join(differs)[:200]}) — give it another name (--set name=…)")
    return study


def setting_jobs(spec: BenchmarkSpec, method: str) -> list[dict[str, Any]]:
    """The method's settings as listed jobs: the trial's one parameter is the setting's number (its
    hyperparameters follow from it, the same in every process, and are logged with the run)."""
    return [{"job": k} for k in range(spec.settings)]


RULE_JOIN = "+"  # a seed run serving several rules: `worst_group+worst_class`


def rule_groups(spec: BenchmarkSpec, chosen: dict[str, Any] | None, row: str) -> list[str]:
    """The rules of `row` as seed runs: rules whose chosen settings agree share one run (each rule
    selects its own epoch in it), so a benchmark trains each (row, setting, seed) once."""
    if chosen is None:
        return list(spec.rules)
    method, by_setting = row.removesuffix(SHUFFLE), {}
    for rule in spec.rules:
        by_setting.setdefault(chosen[method][rule]["setting"], []).append(rule)
    return [RULE_JOIN.join(rules) for rules in by_setting.values()]


def rule_choices(spec: BenchmarkSpec) -> list[str]:
    """Every value a seed run's `rule` parameter can take: each ordered run of the spec's rules."""
    from itertools import combinations

    return [RULE_JOIN.join(c) for n in range(1, len(spec.rules) + 1) for c in combinations(spec.rules, n)]


def seed_jobs(spec: BenchmarkSpec, rows: list[str], chosen: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """(row, rules, seed) of the seed runs of `rows`, numbered in the spec's order (stable across
    parts): with the choices known, one run per row, chosen setting and seed (`rule_groups`)."""
    every = [(row, rule, seed) for row in spec.trained_rows() for rule in rule_groups(spec, chosen, row)
             for seed in sorted(spec.seeds)]
    return [{"job": zlib.crc32(f"{r}:{u}:{s}".encode()) % 2**31, "row": r, "rule": u, "seed": s}
            for r, u, s in every if r in rows]


def chosen_setting(trials: list[optuna.trial.FrozenTrial], rule: str) -> optuna.trial.FrozenTrial | None:
    """The finished setting with the best val score under `rule` (the lower setting on a tie): for
    worst_group the selected epoch's crossed-val worst group, for worst_class the best epoch's."""
    key = f"select_{rule}"
    done = [t for t in trials if t.state == TrialState.COMPLETE and math.isfinite(t.user_attrs.get(key, math.nan))]
    return max(done, key=lambda t: (t.user_attrs[key], -t.params["job"])) if done else None


# ---- output files (the measured parts) -------------------------------------------------------------------

CHOSEN_FILE = "chosen.json"
RUNS_DIR = "runs"


def run_file(out: Path, row: str, rule: str, seed: int) -> Path:
    return out / RUNS_DIR / f"{row}__{rule}__seed{seed}.json"


def load_chosen(opts: BenchmarkOptions) -> dict[str, Any] | None:
    """The settings chosen by an earlier part, if it searched the same benchmark."""
    path = opts.out / CHOSEN_FILE
    if not path.is_file():
        return None
    tree = read_json(path, "benchmark choice", "remove it, or rerun the part that wrote it")
    differs = fingerprint_differences(tree.get("fingerprint") or {}, opts.spec.fingerprint())
    if differs:
        raise UserError(f"{path} was written by another benchmark (differs in {', '.join(differs)[:200]}) — give "
                        "another --out or remove it to search again")
    return tree


# ---- running it ------------------------------------------------------------------------------------------

def _search_runner(opts: BenchmarkOptions, method: str, experiment_id: str, parent: str):
    from .tracking import device_tag, git_commit, log_epoch, tracked_trial
    from .train import fit

    settings = opts.spec.settings_of(method)

    def run(trial: optuna.Trial) -> float:
        k = trial.suggest_int("job", 0, opts.spec.settings - 1)
        params = settings[k]
        trial.set_user_attr("params", params)
        trial.set_user_attr("label", f"{method} setting {k}")
        cfg = opts.spec.search_config(method, params, seed=k)
        import mlflow

        tags = {"study": opts.study_name(method), "trial": str(trial.number), "role": "setting", "method": method,
                "git_commit": git_commit(), "device": device_tag()}
        with tracked_trial(experiment_id, parent, f"{method} setting {k}", tags,
                           lambda run_id: trial.set_user_attr("mlflow_run_id", run_id)):
            mlflow.log_params({**cfg.flat(), "setting": k})
            result = fit(cfg, opts.data, STUDIES / opts.study_name(method) / f"setting-{k:03d}",
                         on_epoch=lambda epoch, record: log_epoch(record), quiet=True)
            scores = {"select_worst_group": result.best.get("worst_group_acc", math.nan),
                      "select_worst_class": max((h.get("val_worst_class_acc", -math.inf) for h in result.history),
                                                default=math.nan)}
            for rule in opts.spec.rules:
                scores.setdefault(f"select_{rule}", result.best.get(SELECT_METRICS[rule], math.nan))
            mlflow.log_metrics({f"best_val_{k2}": v for k2, v in result.best.items() if math.isfinite(v)} | scores)
            for key, value in {**scores, "train_seconds": result.train_seconds}.items():
                trial.set_user_attr(key, value)
            return float(scores["select_worst_group"])

    return run


def _seed_runner(opts: BenchmarkOptions, chosen: dict[str, Any], experiment_id: str, parent: str):
    from .bench import machine_line
    from .diagnostics import score_model
    from .tracking import device_tag, git_commit, log_epoch, tracked_trial
    from .train import fit

    rows, choices = opts.spec.trained_rows(), rule_choices(opts.spec)
    machine = machine_line()

    def run(trial: optuna.Trial) -> float:
        import mlflow

        trial.suggest_int("job", 0, 2**31)
        row, joined = trial.suggest_categorical("row", rows), trial.suggest_categorical("rule", choices)
        seed = trial.suggest_int("seed", 0, 2**31)
        rules = joined.split(RULE_JOIN)
        method = row.removesuffix(SHUFFLE)
        params = chosen[method][rules[0]]["params"]
        cfg = opts.spec.final_config(row, rules[0], params, seed)
        run_dir = STUDIES / opts.study_name("seeds") / f"{row}-{joined}-seed{seed}"
        tags = {"study": opts.study_name("seeds"), "trial": str(trial.number), "role": "seed", "method": row,
                "rule": joined, "git_commit": git_commit(), "device": device_tag(), "part": opts.part_name}
        started = time.time()
        with tracked_trial(experiment_id, parent, f"{row} {joined} seed {seed}", tags,
                           lambda run_id: trial.set_user_attr("mlflow_run_id", run_id)):
            mlflow.log_params({**cfg.flat(), "row": row, "rule": joined})
            result = fit(cfg, opts.data, run_dir, on_epoch=lambda epoch, record: log_epoch(record), quiet=True,
                         also_select=tuple(rules[1:]))
            selected = {rules[0]: (result.best_epoch, result.model), **result.also}
            common = {"row": row, "seed": seed, "part": opts.part_name, "machine": machine, "commit": git_commit(),
                      "params": params, "setting": chosen[method][rules[0]]["setting"], "shared_run": joined,
                      "training": f"{row} {joined} seed {seed}",
                      "val": {k: v for k, v in result.best.items() if k in METRICS},
                      **losses_of(result.history),
                      "epochs": cfg.train.epochs,
                      "images": sum(h["images_per_s"] * h["train_seconds"] for h in result.history),
                      "train_seconds": result.train_seconds, "started": started}
            scored: dict[int, dict[str, float]] = {}  # by epoch: rules selecting the same epoch share its scores
            refits: dict[tuple[str, int], dict[str, float]] = {}  # and its refits, by (method, epoch)
            for rule in rules:
                epoch, model = selected[rule]
                if epoch not in scored:
                    scored[epoch] = score_model(model, cfg, opts.data)[0]
                test = scored[epoch]
                if not test:
                    raise UserError(f"{opts.data}/test has no labels: the benchmark scores seed runs on the labelled "
                                    "test split")
                if row == SHARED_BASE:  # first the refits of this model (a killed run redoes them all)
                    _refit_records(opts, common, rule, epoch, model, refits)
                record = {**common, "rule": rule, "epoch": epoch, "test": {k: v for k, v in test.items() if k in METRICS},
                          "ended": time.time()}
                write_record(run_file(opts.out, row, rule, seed), record)
                mlflow.log_metrics({f"test_{rule}_{k}": v for k, v in record["test"].items() if math.isfinite(v)})
            return float(scored[selected[rules[0]][0]].get(SELECT_METRICS[rules[0]], math.nan))

    return run


def _refit_records(opts: BenchmarkOptions, common: dict[str, Any], rule: str, epoch: int, model: Any,
                   done: dict[tuple[str, int], dict[str, float]]) -> None:
    """The refit rows' records for one rule of an ERM seed run: each post-hoc method (DFR) applied to
    the model the rule selected, scored on the test set — once per (method, epoch) of the run, kept
    in `done` (rules selecting the same epoch share it, as they share its ERM scores). Their
    training is the ERM run's, counted there (`train_seconds` 0 here); `seconds` is the refit's and
    scoring's own."""
    import mlflow

    from .diagnostics import score_refit

    for method in opts.spec.refits:
        started = time.time()
        if (method, epoch) not in done:
            cfg = opts.spec.final_config(method, rule, common["params"], common["seed"])
            done[(method, epoch)] = score_refit(model, cfg, opts.data)
        record = {**common, "row": method, "rule": rule, "epoch": epoch, "refit_of": SHARED_BASE, "val": {},
                  "train_seconds": 0.0, "images": 0, "test": done[(method, epoch)],
                  "seconds": time.time() - started, "started": started, "ended": time.time()}
        write_record(run_file(opts.out, method, rule, common["seed"]), record)
        mlflow.log_metrics({f"test_{method}_{rule}_{k}": v for k, v in record["test"].items() if math.isfinite(v)})


def _search_complete(study: optuna.Study, settings: int) -> bool:
    done = {t.params.get("job") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    return len(done) >= settings


def _choose(opts: BenchmarkOptions, studies: dict[str, optuna.Study]) -> dict[str, Any]:
    """Each method's chosen setting per rule (reference rows take their method's), written to
    `chosen.json` with every setting's val scores."""
    chosen, search = {}, []
    for method, study in studies.items():
        trials = study.get_trials(deepcopy=False)
        chosen[method] = {}
        for rule in opts.spec.rules:
            best = chosen_setting(trials, rule)
            chosen[method][rule] = {"setting": best.params["job"], "params": best.user_attrs["params"],
                                    "val": best.user_attrs[f"select_{rule}"]}
        for t in trials:
            if t.state == TrialState.COMPLETE:
                search.append({"method": method, "setting": t.params["job"], "params": t.user_attrs["params"],
                               **{k: t.user_attrs.get(k) for k in t.user_attrs if k.startswith("select_")},
                               "train_seconds": t.user_attrs.get("train_seconds")})
    for method in opts.spec.refits:  # no search of their own: the base's choice, whose runs they refit
        chosen[method] = {rule: {**choice, "refit_of": SHARED_BASE} for rule, choice in chosen[SHARED_BASE].items()}
    tree = {"fingerprint": opts.spec.fingerprint(), "chosen": chosen, "search": search}
    write_text_atomic(opts.out / CHOSEN_FILE, json.dumps(tree, indent=2, sort_keys=True) + "\n")
    return tree


def benchmark(opts: BenchmarkOptions) -> str:
    """Run (or join, or resume) the benchmark until every setting and every seed run of
    `opts.spec.seeds` is finished (or `timeout` passes), then aggregate the output folder."""
    from .data.layout import load_split
    from .tracking import init_tracking

    spec = opts.spec
    require_writable(opts.out, "folder")
    load_split(opts.data, "val")  # fail fast on a missing dataset
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    earlier = load_chosen(opts)
    studies = {} if earlier else {m: _open(opts, m) for m in spec.searched}
    seeds_study = _open(opts, "seeds")
    experiment_id = init_tracking(opts.tracking_uri, f"benchmark-{spec.name}")
    claim = ClaimLock(opts.storage or DEFAULT_STORAGE, opts.study_name("seeds"))
    claim.acquire()  # processes starting together: one makes the parent run, the others find it
    try:
        parent = ensure_parent_run(seeds_study, experiment_id, f"benchmark {spec.name}",
                                   {"role": "benchmark", "study": opts.study_name("seeds")},
                                   {"methods": ",".join(spec.methods), "reference": ",".join(spec.reference),
                                    "settings": spec.settings, "rules": ",".join(spec.rules), "preset": spec.preset})
    finally:
        claim.release()
    worker = WorkerSettings(experiment_id=experiment_id, heartbeat=opts.heartbeat, grace=opts.grace,
                            deadline=time.monotonic() + opts.timeout if opts.timeout else math.inf,
                            storage=opts.storage or DEFAULT_STORAGE, retry=False)
    since = time.time()
    trained = spec.trained_rows()
    fewest, most = len(trained) * len(spec.seeds), len(seed_jobs(spec, trained))
    refits = f"; {', '.join(spec.refits)} refit the {SHARED_BASE} runs' models" if spec.refits else ""
    print(f"benchmark {spec.name}: {len(spec.searched)} methods x {spec.settings} settings, then "
          f"{fewest if fewest == most else f'{fewest}-{most}'} seed runs "
          f"(rules that choose the same setting share a run{refits}; {opts.part_name})", flush=True)

    def report(frozen: optuna.trial.FrozenTrial) -> None:
        what = frozen.user_attrs.get("label") or ", ".join(f"{k} {v}" for k, v in frozen.params.items() if k != "job")
        print(f"  {frozen.state.name.lower():<8} {what}", flush=True)

    try:
        while time.monotonic() < worker.deadline:
            for method, study in studies.items():  # claim what is free; come back for the rest
                jobs = setting_jobs(spec, method)
                run_shared_trials(study, ClaimLock(opts.storage or DEFAULT_STORAGE, study.study_name),
                                  lambda s, jobs=jobs: next_listed(s, jobs, since),
                                  _search_runner(opts, method, experiment_id, parent), worker, report, wait=False)
            ready = [m for m in spec.searched if earlier or _search_complete(studies[m], spec.settings)]
            if ready and len(ready) == len(spec.searched):
                chosen = (earlier or _choose(opts, studies))["chosen"]
                run_shared_trials(seeds_study, ClaimLock(opts.storage or DEFAULT_STORAGE, seeds_study.study_name),
                                  lambda s: next_listed(s, seed_jobs(spec, trained, chosen), since),
                                  _seed_runner(opts, chosen, experiment_id, parent), worker, report, wait=True)
                break
            if not _anything_running(studies):
                # Another worker may have finished the last setting between the two looks: look again.
                ready = [m for m in spec.searched if _search_complete(studies[m], spec.settings)]
                if len(ready) == len(spec.searched):
                    continue
                failed = [m for m in spec.searched if m not in ready]
                raise UserError(f"the search of {', '.join(failed)} did not finish: a setting failed (its error is in "
                                "MLflow and above) — fix the cause and run the command again to retry it")
            time.sleep(min(opts.heartbeat, 5))  # others' settings still run: their seeds follow
    finally:
        table = aggregate(opts.out, spec) if (opts.out / RUNS_DIR).is_dir() else ""
    return table


def _anything_running(studies: dict[str, optuna.Study]) -> bool:
    return any(s.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)) for s in studies.values())


# ---- the table, from the files alone ---------------------------------------------------------------------

def read_runs(out: Path) -> list[dict[str, Any]]:
    return read_records(out / RUNS_DIR, "benchmark run")


def summary_rows(runs: list[dict[str, Any]], spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Per (row, rule): seeds finished, the chosen setting, every interval metric's mean and 95 %
    interval over the seeds that trained (a diverged seed, or one whose loss spiked, is named, never averaged in)."""
    rows = []
    for row in spec.rows():
        for rule in spec.rules:
            mine = [r for r in runs if r["row"] == row and r["rule"] == rule and r["seed"] in spec.seeds]
            failed = {r["seed"]: why for r in mine if (why := not_converged(r))}
            out: dict[str, Any] = {"method": row, "rule": rule, "seeds_done": len(mine) - len(failed),
                                   "seeds": len(spec.seeds), "params": mine[0]["params"] if mine else {},
                                   "setting": mine[0]["setting"] if mine else None,
                                   "not_converged": [f"{seed} ({why})" for seed, why in sorted(failed.items())],
                                   "clipped_steps": sum(int(r.get("clipped_steps", 0)) for r in mine),
                                   "parts": sorted({r["part"] for r in mine})}
            trained = [r for r in mine if r["seed"] not in failed]
            for key, metric in METRICS.items():
                if metric.interval:
                    mean, sd, lo, hi = seed_interval(r["test"].get(key, math.nan) for r in trained)
                    out |= {f"{key}_mean": mean, f"{key}_sd": sd, f"{key}_ci_low": lo, f"{key}_ci_high": hi}
            rows.append(out)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    mean, lo, hi = row[f"{key}_mean"], row[f"{key}_ci_low"], row[f"{key}_ci_high"]
    if not math.isfinite(mean):
        return "missing"
    return f"{mean:.1f}" + (f" [{lo:.1f}, {hi:.1f}]" if math.isfinite(lo) else "")


def aggregate(out: Path, spec: BenchmarkSpec) -> str:
    """`benchmark.md` and `benchmark.csv` in `out` from its run files (every part that left them)."""
    import pandas as pd

    runs = read_runs(out)
    rows = summary_rows(runs, spec)
    keys = [k for k, m in METRICS.items() if m.interval]
    flat = [{k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows]
    with atomic_path(out / "benchmark.csv") as tmp:
        pd.DataFrame(flat).to_csv(tmp, index=False)
    lines = ["| method | rule | seeds | " + " | ".join(METRICS[k].title for k in keys) + " | setting | not converged | clipped steps |",
             "|" + "---|" * (6 + len(keys))]
    for r in rows:
        label = r["method"] + (" (reference: knows where the digit is)" if r["method"] in spec.reference else
                               f" (refit of the {SHARED_BASE} runs' models)" if r["method"] in spec.refits else "")
        params = ", ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in sorted(r["params"].items())) or "–"
        lines.append(f"| {label} | {r['rule']} | {r['seeds_done']}/{r['seeds']} | "
                     + " | ".join(_cell(r, k) for k in keys)
                     + f" | {r['setting'] if r['setting'] is not None else '–'}: {params} | "
                     f"{', '.join(map(str, r['not_converged'])) or '–'} | {r['clipped_steps']} |")
    budget = (f"{spec.settings} settings per method on the search recipe (epochs selected by worst-group val), then "
              f"seeds {', '.join(map(str, spec.seeds))} of each chosen setting on the final recipe; rules: "
              f"{', '.join(spec.rules)}")
    if spec.refits:
        budget += (f"; {', '.join(spec.refits)}: no search or training of its own — each {SHARED_BASE} seed run's "
                   "selected model, its last layer refit (its own regularisation chosen on half of val)")
    search = spec.search_config(spec.methods[0], {}, 0).train
    final = spec.final_config(spec.methods[0], spec.rules[0], {}, 0).train
    text = "\n".join([
        f"# Benchmark `{spec.name}`", "",
        "Test accuracy (%) on the unbiased test set: mean over seeds with the 95 % Student-t interval in brackets. "
        "`rule` is how the setting and the epoch were selected: `worst_group` by the worst (class, digit) cell of the "
        "crossed val, `worst_class` by the worst class (no attribute needed). `seeds` counts the seeds averaged; "
        f"`not converged` names the others — a seed whose {DEFECT_RULE}: a recipe defect, never averaged in. "
        "`clipped steps`: the optimizer "
        "steps of those seeds whose gradient norm `train.grad_clip` scaled down (0: trained as without it).", "",
        f"Budget: {budget}. Search recipe: preset `{spec.preset}`, {search.epochs} epochs, "
        f"{search.subset or 'all'} training images. Final recipe: {final.epochs} epochs, {final.subset or 'all'} images.",
        "", *lines, "", "Parts:", *part_lines(runs, "seed runs"), ""])
    write_text_atomic(out / "benchmark.md", text)
    return text


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
