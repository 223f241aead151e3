"""`shortcut-study` command line: argument parsing only; every command calls one library function."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import SELECT_METRICS
from .errors import UserError, disk_full, interrupts_unwrapped


def _add_set_arg(p: argparse.ArgumentParser, example: str = "train.lr=0.05") -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help=f"override any config value, e.g. --set {example} (repeatable)")


def _add_config_args(p: argparse.ArgumentParser, epochs: bool = True) -> None:
    p.add_argument("--preset", help="a preset name from shortcut_study/presets/ or a .toml path")
    _add_set_arg(p)
    if epochs:
        p.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
        p.add_argument("--seed", type=int, help="shorthand for --set train.seed=N")


def _config(args: argparse.Namespace, base: dict | None = None):
    from .config import make_config

    sets = list(args.set)
    for name in ("epochs", "seed", "subset"):
        if getattr(args, name, None) is not None:
            sets.append(f"train.{name}={getattr(args, name)}")
    return make_config(getattr(args, "preset", None), sets, base)


def cmd_data_build(args: argparse.Namespace) -> None:
    from .config import make_config
    from .data.composite import build_dataset

    sets = list(args.set) + ([f"build.seed={args.seed}"] if args.seed is not None else [])
    cfg = make_config(args.preset, sets)
    t0 = time.perf_counter()
    table = build_dataset(args.cifar, args.mnist, args.out, cfg.build, cfg.geometry, args.download)
    print(table)
    print(f"built {args.out} in {time.perf_counter() - t0:.1f} s")


def cmd_data_annotate(args: argparse.Namespace) -> None:
    from .data.oracle import annotate

    from .config import make_config

    geometry = make_config(sets=[s for s in args.set if s.strip().startswith("geometry.")]).geometry
    others = [s for s in args.set if not s.strip().startswith("geometry.")]
    if others:
        raise UserError(f"data annotate takes geometry.* values only (got {others[0]!r})")
    print(annotate(args.data, oracle=args.oracle, mnist=args.mnist, force=args.force, geom=geometry))


def cmd_data_oracle(args: argparse.Namespace) -> None:
    from .data.oracle import train_oracle

    print(train_oracle(args.mnist, args.out, epochs=args.epochs, seed=args.seed))


def cmd_train(args: argparse.Namespace) -> None:
    from .metrics import format_metrics
    from .run import Run
    from .train import fit_replacing

    # A resumed run starts from its saved config; options given now must agree with it.
    state = Run(Path(args.out)).load_last() if args.resume else None
    cfg = _config(args, base=state["config"] if state is not None else None)
    result = fit_replacing(cfg, args.data, args.out, resume=args.resume, state=state)
    print(f"best epoch {result.best_epoch} | {result.train_seconds:.0f} s training, {result.images_per_s:.0f} "
          f"images/s ({result.runtime}); val, selected model:")
    print(format_metrics(result.best))
    print(f"checkpoint: {result.out_dir / 'q1_model.pt'}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .evaluate import predict_folder

    n = predict_folder(args.checkpoint, args.images, args.out, canvas=args.canvas, tta=args.tta)
    print(f"wrote {n} predictions to {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import format_grade, grade

    print(format_grade(grade(args.predictions, args.labels)))


def cmd_sweep(args: argparse.Namespace) -> None:
    from .study import SweepOptions, sweep, validate_sweep

    opts = SweepOptions(data=Path(args.data), study=args.study, n_trials=args.n_trials,
                        timeout=args.timeout or None, storage=args.storage, tracking_uri=args.tracking_uri,
                        epochs=args.epochs, subset=args.subset, objective=args.objective, seed=args.seed,
                        sets=tuple(args.set), heartbeat=args.heartbeat, grace=args.grace,
                        search_shuffle=args.search_shuffle)
    if args.workers > 1:
        validate_sweep(opts)  # once, here, rather than N times in the workers
    if _spawned(args, "sweep"):
        return
    print(sweep(opts))


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import CompareOptions, aggregate, compare, load_grid

    opts = CompareOptions(grid=load_grid(args.grid, args.set), cifar=args.cifar, mnist=args.mnist,
                          download=args.download, data_root=Path(args.data_root), storage=args.storage,
                          tracking_uri=args.tracking_uri, out=Path(args.out), timeout=args.timeout or None,
                          heartbeat=args.heartbeat, grace=args.grace, part=args.part)
    if args.aggregate:
        print(aggregate(opts))
        return
    if not (args.cifar and args.mnist):
        raise UserError("compare builds its datasets from --cifar and --mnist: give both "
                        "(only --aggregate works without them)")
    if _spawned(args, "compare"):
        print(aggregate(opts))
        return
    print(compare(opts))


def cmd_benchmark(args: argparse.Namespace) -> None:
    from .benchmark import BenchmarkOptions, aggregate, benchmark, load_spec

    opts = BenchmarkOptions(spec=load_spec(args.spec, args.set), data=Path(args.data), storage=args.storage,
                            tracking_uri=args.tracking_uri, out=Path(args.out), part=args.part,
                            timeout=args.timeout or None, heartbeat=args.heartbeat, grace=args.grace)
    if args.aggregate:
        print(aggregate(opts.out, opts.spec))
        return
    if _spawned(args, "benchmark"):
        print(aggregate(opts.out, opts.spec))
        return
    print(benchmark(opts))


def _spawned(args: argparse.Namespace, what: str) -> bool:
    """With --workers N > 1: run N pinned copies of this command without the flag, and True when
    they are done (a worker's failure is one error line, its own); False for one worker."""
    from .trials import spawn_workers

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    if args.workers == 1:
        return False
    argv = sys.argv[1:] if args.argv is None else args.argv
    code, error = spawn_workers(_without_flag(argv, "--workers"), args.workers)
    if code:
        raise UserError(error or f"a {what} worker exited with code {code}")
    return True


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(f"{flag}="):
            out.append(a)
    return out


def cmd_submission(args: argparse.Namespace) -> None:
    from .submission import CODE_FILES, RESULT_FILES, write_submission

    folder = write_submission(args.name, out=args.out, run=args.run, results=args.results, data=args.data)
    print(f"wrote {folder}: code/ ({', '.join(CODE_FILES)}), results/ ({', '.join(RESULT_FILES)})")


def cmd_best(args: argparse.Namespace) -> None:
    from .study import best

    print(best(args.data, args.study, args.storage, args.tracking_uri, args.out))


def cmd_report(args: argparse.Namespace) -> None:
    from .report import build_report

    print(build_report(args.checkpoint, args.data, args.out, history=args.history, study=args.study or None,
                       storage=args.storage, tracking_uri=args.tracking_uri, layers=tuple(args.layers.split(",")),
                       tta=args.tta))


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench, run_methods_table

    if args.methods:
        print(run_methods_table(args.data, sets=args.set, md=args.md))
        return
    print(run_bench(args.data, quick=args.quick, presets=tuple(args.presets.split(",")), sets=args.set,
                    steps=args.steps, md=args.md, results=Path(args.results) if args.results else None))


def cmd_server(args: argparse.Namespace) -> None:
    from .server import serve

    serve(Path(args.root), host=args.host, pg_port=args.pg_port, mlflow_port=args.port)


def cmd_ui(args: argparse.Namespace) -> None:
    from .server import ui

    ui(args.tracking_uri, Path(args.artifacts), args.port)


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/course")
    p.add_argument("--study", default="shortcut", help="study name (= MLflow experiment name)")
    p.add_argument("--storage", help="Optuna storage: an RDB URL (default sqlite:///studies/optuna.db), "
                   "postgresql://… for several machines, or PATH.journal")
    p.add_argument("--tracking-uri", help="MLflow store (default sqlite:///mlruns/mlflow.db)")


def _add_worker_args(p: argparse.ArgumentParser, unit: str, shared: str) -> None:
    """Options of the worker loop several processes share a study with (trials.py)."""
    p.add_argument("--heartbeat", type=int, default=30, help=f"seconds between a running {unit}'s heartbeats")
    p.add_argument("--grace", type=int, default=90, help=f"seconds without heartbeat before a {unit} is failed and "
                   "run again")
    p.add_argument("--workers", type=int, default=1, help=f"processes on this host sharing the {shared}, each pinned "
                   "to its share of the cores (other hosts join with the same command and --storage)")


def _add_part_args(p: argparse.ArgumentParser, records: str) -> None:
    """Options of a study measured in parts (parts.py): naming this one, or only aggregating."""
    p.add_argument("--part", default="", help="name of what this command measures (default: host and date)")
    p.add_argument("--aggregate", action="store_true", help=f"only write the tables from {records}")


class _Parser(argparse.ArgumentParser):
    """argparse's exit code 2, but one `error:` line naming the flag instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shortcut-study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="build or annotate a composite dataset").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("build", help="build the 40x40 composite dataset in the course layout")
    p.add_argument("--cifar", required=True, help="CIFAR-10: torchvision root, class-folder tree or .tar.gz")
    p.add_argument("--mnist", required=True, help="MNIST: torchvision root, class-folder tree or .tar.gz")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, help="shorthand for --set build.seed=N")
    p.add_argument("--download", action="store_true", help="fetch missing sources with torchvision (online)")
    p.add_argument("--preset", help=argparse.SUPPRESS)
    _add_set_arg(p, "build.train_agreement=0.9 or geometry.digit_size=12")
    p.set_defaults(func=cmd_data_build)

    p = data.add_parser("annotate", help="label each image's digit with the digit oracle (writes metadata.csv)")
    p.add_argument("data", help="dataset folder in the course layout")
    p.add_argument("--oracle", help="oracle weights (default: the one shipped with the package)")
    p.add_argument("--mnist", help="MNIST source to train an oracle when none is shipped")
    p.add_argument("--force", action="store_true", help="replace an existing metadata.csv")
    _add_set_arg(p, "geometry.digit_size=12 (where the digit sits in these images)")
    p.set_defaults(func=cmd_data_annotate)

    p = data.add_parser("oracle", help="train the digit oracle on MNIST rendered as in the composites")
    p.add_argument("--mnist", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_oracle)

    p = sub.add_parser("train", help="train the required CNN on a dataset folder")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="run folder (q1_model.pt, last.pt, history.csv)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--subset", type=int, help="shorthand for --set train.subset=N")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="write <file>,<label> for every PNG of a folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--canvas", type=int, help="expected image size in pixels (default: the run's geometry.canvas)")
    p.add_argument("--tta", default="auto", help="test-time augmentation: none, flip, flip_shift, or auto = "
                   "the run's train.tta (from the config.json beside the checkpoint; none if there is none)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="grade a predictions file against test_labels.csv")
    p.add_argument("--predictions", required=True)
    p.add_argument("--labels", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="run or resume the Optuna study; every trial is an MLflow run")
    _add_study_args(p)
    p.add_argument("--n-trials", type=int, default=24, help="finished trials the study should hold")
    p.add_argument("--timeout", type=float, default=40 * 60, help="seconds; 0 = none")
    p.add_argument("--epochs", type=int, help="fix the epochs of every trial (default: searched)")
    p.add_argument("--subset", type=int, default=15_000, help="train on N training images (0 = all)")
    p.add_argument("--objective", default="val_acc",
                   help=f"what each trial maximises and selects its epoch by, as train.select: {', '.join(SELECT_METRICS)}")
    p.add_argument("--search-shuffle", action="store_true",
                   help="also search augment.digit_shuffle_p (off by default: shuffle knows where the digit is)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    _add_worker_args(p, "trial", "study")
    _add_set_arg(p, "augment.translate=3 (the base config of every trial)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="the shortcut-strength study: methods x agreement x digit size x seeds, "
                       "aggregated with error bars and plotted")
    p.add_argument("--grid", default="experiments/compare.toml", help="the grid's TOML file (or a name under experiments/)")
    p.add_argument("--cifar", help="CIFAR-10 source, as for `data build` (not needed with --aggregate)")
    p.add_argument("--mnist", help="MNIST source, as for `data build` (not needed with --aggregate)")
    p.add_argument("--download", action="store_true", help="fetch missing sources with torchvision (online)")
    p.add_argument("--data-root", default="data", help="where each cell's dataset is cached (by a hash of its build)")
    p.add_argument("--storage", help="Optuna storage shared by every process of the comparison (default: the sweep's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")
    p.add_argument("--out", default="results/compare", help="folder for the tables and plots")
    p.add_argument("--timeout", type=float, default=0, help="seconds after which no new cell starts; 0 = none")
    _add_worker_args(p, "cell", "grid")
    _add_part_args(p, "the cell records beside --out (OUT-cells/, every part's)")
    _add_set_arg(p, "seeds=0,1 (an axis), name=mine, or train.epochs=2 (the recipe)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("benchmark", help="every method tuned alike (the same settings budget, selection by "
                       "worst-group val), then seeds of each choice on the final recipe, with 95 %% intervals")
    p.add_argument("--spec", default="experiments/benchmark.toml", help="the benchmark's TOML file (or a name under experiments/)")
    p.add_argument("--data", default="data/course")
    p.add_argument("--storage", help="Optuna storage shared by every process (default: the sweep's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")
    p.add_argument("--out", default="results/benchmark", help="folder for chosen.json, runs/ and the table")
    p.add_argument("--timeout", type=float, default=0, help="seconds after which no new run starts; 0 = none")
    _add_worker_args(p, "run", "benchmark")
    _add_part_args(p, "the run files in --out (every part's)")
    _add_set_arg(p, "seeds=0 (a part), settings=2, or train.epochs=2 (both recipes)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("submission", help="the course's folder first_last_project_2/ (code/ and results/)")
    p.add_argument("--name", required=True, help="first_last, as the course names the folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help="a training run's folder (predicts the test set and makes the report if missing)")
    src.add_argument("--results", help="an export's folder (default results/, what `make best` writes)")
    p.add_argument("--data", default="data/course", help="the dataset, to predict its test folder and check q1_test.txt")
    p.add_argument("--out", default=".", help="where the folder goes")
    p.set_defaults(func=cmd_submission)

    p = sub.add_parser("best", help="export the best run's q1_model.pt and q1_test.txt")
    _add_study_args(p)
    p.add_argument("--out", default="results")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("report", help="figures and report.pdf for a checkpoint (default: the exported best run)")
    _add_study_args(p)
    p.add_argument("--checkpoint", help="default: OUT/q1_model.pt from `best`")
    p.add_argument("--out", default="results")
    p.add_argument("--history", help="history.csv of the run (default: beside the checkpoint, or from MLflow)")
    p.add_argument("--layers", default="conv1,conv5", help="layers for the class-wise activation plots")
    p.add_argument("--tta", default="auto", help="test-time augmentation for the headline accuracy (none, flip, "
                   "flip_shift; auto = the run's, from the config.json beside the checkpoint)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("server", help="PostgreSQL for the Optuna storage + an MLflow tracking server, for a team")
    p.add_argument("--root", default="studies", help="folder for the database cluster and the artifacts")
    p.add_argument("--host", default="127.0.0.1", help="interface both listen on (0.0.0.0 for every interface: "
                   "then anyone who can reach this machine can use them)")
    p.add_argument("--pg-port", type=int, default=55432)
    p.add_argument("--port", type=int, default=5000, help="the MLflow server's port")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("ui", help="MLflow's UI on the study's tracking store (`make ui`)")
    p.add_argument("--tracking-uri", required=True, help="the tracking store (e.g. sqlite:///mlruns/mlflow.db)")
    p.add_argument("--artifacts", default="mlruns/artifacts", help="the artifact root of that store")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("bench", help="training speed and accuracy table for this machine")
    p.add_argument("--data", default="data/course")
    p.add_argument("--quick", action="store_true", help="throughput rows only (a few minutes)")
    p.add_argument("--methods", action="store_true", help="the debiasing-methods table (preset `methods`, about an "
                   "hour on 2 CPU cores) instead of the speed table; --md results/methods.md writes it")
    p.add_argument("--presets", default="default,fast,best,erm", help="presets trained in full (not with --quick)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per throughput row (after 20 warm-up)")
    p.add_argument("--md", help="also write the table as Markdown to this file")
    p.add_argument("--results", help="copy the best preset's q1_model.pt and q1_test.txt into this folder")
    _add_set_arg(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _one_line(text: str) -> str:
    # Names from the file system may hold bytes that are not UTF-8 (surrogate escapes).
    return " ".join(text.split()).encode("utf-8", "backslashreplace").decode("utf-8")


def _on_sigint(signum: int, frame: object) -> None:
    # Ctrl-C can land inside a constructor (tqdm's, say); the half-built object's finaliser then
    # fails as it is collected, and Python prints that as a traceback. After an interrupt that is noise.
    sys.unraisablehook = lambda unraisable: None
    raise KeyboardInterrupt


def _catch_interrupts() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def main(argv: list[str] | None = None) -> int:
    _catch_interrupts()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line printed by _Parser)
        return int(exc.code or 0)
    args.argv = argv
    import warnings

    # Library warnings (torch, sklearn, mlflow) are for developers; a user sees results or one error line.
    warnings.filterwarnings("ignore")
    try:
        with interrupts_unwrapped():
            args.func(args)
    except UserError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and friends
        return 0
    except OSError as exc:  # a path that cannot be read or written: a full disk, a read-only mount, ...
        where = exc.filename or "a file"
        why = ("the disk is full — free some space and run the command again" if disk_full(exc)
               else exc.strerror or str(exc))
        print(f"error: {_one_line(f'cannot read or write {where}: {why}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
