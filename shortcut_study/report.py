"""Figures and the PDF report: filters, class-wise activations, confusion, curves, shortcut
diagnostics, sweep summary. Every number in the text is computed here, never typed."""

from __future__ import annotations

import math
import os
import shutil
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from .config import CIFAR_CLASSES, GeometryConfig  # noqa: E402
from .data.layout import TEST_DIRS, load_split  # noqa: E402
from .diagnostics import class_activation_norms, selectivity, shortcut_diagnostics  # noqa: E402
from .errors import UserError, atomic_path, read_json, require_writable  # noqa: E402
from .diagnostics import LAYERS  # noqa: E402
from .evaluate import confusion, evaluate_split, rubric_band  # noqa: E402
from .metrics import gap_interval  # noqa: E402
from .model import CNN  # noqa: E402
from .run import Run  # noqa: E402
from .runtime import resolve_runtime  # noqa: E402
from .tracking import confusion_figure  # noqa: E402

SHORT = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class Report:
    """Saves each figure as a PNG the moment it is made (and closes it) into a staging folder;
    remembers the pages for the PDF, where each is laid out alike: the figure above, its computed
    text below. `publish` swaps the staged figures/ and report.pdf in as one unit, so figures/
    always matches report.pdf and a failed report leaves the previous one whole."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.staging = out / ".report.partial"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.figures = self.staging / "figures"
        self.figures.mkdir(parents=True)
        self.headline: list[str] = []
        self.pages: list[tuple[Path, str]] = []
        self.count = 0

    def publish(self) -> None:
        self.write_pdf(self.staging / "report.pdf")
        old = self.out / ".figures.old"
        shutil.rmtree(old, ignore_errors=True)
        if (self.out / "figures").exists():
            os.replace(self.out / "figures", old)
        os.replace(self.figures, self.out / "figures")
        os.replace(self.staging / "report.pdf", self.out / "report.pdf")
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def add(self, name: str, fig: plt.Figure, text: str = "", in_pdf: bool = True) -> None:
        path = self.figures / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        self.count += 1
        if in_pdf:
            self.pages.append((path, text))

    def write_pdf(self, path: Path) -> None:
        with atomic_path(path) as tmp, PdfPages(tmp) as pdf:
            title = plt.figure(figsize=(11.69, 8.27))
            title.text(0.06, 0.88, "shortcut_study report", fontsize=24, weight="bold")
            title.text(0.06, 0.83, "What the required CNN learned from CIFAR-10 + MNIST composites", fontsize=13)
            for k, line in enumerate(self.headline):
                title.text(0.06, 0.74 - 0.05 * k, textwrap.fill(line, 120), fontsize=11, va="top")
            pdf.savefig(title)
            plt.close(title)
            for png, text in self.pages:
                page = plt.figure(figsize=(11.69, 8.27))
                ax = page.add_axes((0.03, 0.16, 0.94, 0.80))
                ax.imshow(plt.imread(png))
                ax.axis("off")
                page.text(0.05, 0.12, textwrap.fill(text, 150), fontsize=10, va="top")
                pdf.savefig(page, dpi=150)
                plt.close(page)


# ---- figures ------------------------------------------------------------------------------------

def conv1_filter_figures(model: CNN) -> tuple[plt.Figure, plt.Figure]:
    w = model.conv1.weight.detach().cpu().numpy()  # (16, 3, 7, 7)
    rgb, ax = plt.subplots(2, 8, figsize=(10, 3.2))
    for i, a in enumerate(ax.flat):
        f = w[i].transpose(1, 2, 0)
        a.imshow((f - f.min()) / max(f.max() - f.min(), 1e-12), interpolation="nearest")
        a.set_title(f"filter {i}", fontsize=8)
        a.axis("off")
    rgb.suptitle("conv1 filters (3x7x7 each, min-max normalised, shown as RGB)")
    rgb.tight_layout()
    chans, ax = plt.subplots(3, 16, figsize=(13, 3.4))
    lim = np.abs(w).max()
    for c in range(3):
        for i in range(16):
            ax[c, i].imshow(w[i, c], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax[c, i].set_xticks([])
            ax[c, i].set_yticks([])
            if c == 0:
                ax[c, i].set_title(str(i), fontsize=8)
        ax[c, 0].set_ylabel("RGB"[c], rotation=0, labelpad=10)
    chans.suptitle("conv1 filters per input channel (red = positive, blue = negative, shared scale)")
    chans.tight_layout()
    return rgb, chans


def filter_bar(norms: np.ndarray, layer: str, i: int) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    ax.bar(range(10), norms[:, i], color="tab:blue")
    ax.set_xticks(range(10), SHORT, rotation=60, fontsize=7)
    ax.set_ylabel("mean ||activation||₂")
    ax.set_title(f"{layer} filter {i}: class-wise mean activation norm", fontsize=9)
    fig.tight_layout()
    return fig


def norms_overview(norms: np.ndarray, layer: str, start: int, count: int) -> plt.Figure:
    cols = 4
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.1 * rows), squeeze=False)
    for k, a in enumerate(axes.flat):
        i = start + k
        if k >= count:
            a.axis("off")
            continue
        a.bar(range(10), norms[:, i], color="tab:blue")
        a.set_title(f"{layer} filter {i}", fontsize=8)
        a.set_xticks(range(10), SHORT, rotation=90, fontsize=6)
        a.tick_params(axis="y", labelsize=6)
    fig.suptitle(f"{layer}: class-wise mean activation norm, filters {start}–{start + count - 1}")
    fig.tight_layout()
    return fig


def norms_heatmap(norms: np.ndarray, layer: str) -> plt.Figure:
    rel = norms / np.maximum(norms.mean(0, keepdims=True), 1e-12)  # each filter relative to its own mean
    fig, ax = plt.subplots(figsize=(min(14, 2 + norms.shape[1] * 0.14), 3.6))
    im = ax.imshow(rel, aspect="auto", cmap="viridis")
    ax.set_yticks(range(10), CIFAR_CLASSES, fontsize=7)
    ax.set_xlabel("filter")
    ax.set_title(f"{layer}: class-wise mean activation norm / the filter's mean over classes")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def selectivity_figure(sel: dict[str, dict[str, np.ndarray]]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for layer, s in sel.items():
        axes[0].hist(s["cv"], bins=20, alpha=0.6, label=layer)
        axes[1].hist(s["si"], bins=20, alpha=0.6, label=layer)
    axes[0].set_title("coefficient of variation across classes")
    axes[1].set_title("selectivity index (0 uniform, 1 one class)")
    for a in axes:
        a.set_ylabel("filters")
        a.legend()
    fig.tight_layout()
    return fig


def curves_figure(history: pd.DataFrame) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(history["epoch"], history["train_loss"], label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for col, label in (("train_acc", "train"), ("val_acc", "val"), ("val_aligned_acc", "val digit-aligned"),
                       ("val_conflicting_acc", "val digit-conflicting")):
        if col in history:  # val columns are empty on epochs that were not evaluated (train.eval_every)
            scored = history.dropna(subset=[col])
            axes[1].plot(scored["epoch"], scored[col], marker="." if len(scored) < len(history) else None, label=label)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def shortcut_figure(diag, geom: GeometryConfig) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    bars = {"all": diag.metrics["acc"], "digit-aligned": diag.metrics.get("aligned_acc", np.nan),
            "digit-conflicting": diag.metrics.get("conflicting_acc", np.nan),
            "digit set to label": diag.counterfactual["cf_aligned_acc"],
            "digit set to another": diag.counterfactual["cf_conflicting_acc"],
            "digit blanked": diag.digit_blanked_acc, "CIFAR blanked": diag.cifar_blanked_acc}
    colors = ["gray", "tab:green", "tab:red", "yellowgreen", "salmon", "tab:blue", "tab:orange"]
    axes[0].bar(range(len(bars)), list(bars.values()), color=colors)
    axes[0].set_xticks(range(len(bars)), list(bars), rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("val accuracy (%)")
    axes[0].set_title("accuracy under shortcut tests")
    im = axes[1].imshow(diag.occlusion_map, cmap="magma")
    axes[1].set_title("occlusion: mean drop in true-class prob.")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    names = list(diag.quadrant_share)
    axes[2].barh(range(len(names)), [diag.quadrant_share[k] for k in names], color="tab:purple")
    axes[2].set_yticks(range(len(names)), names, fontsize=8)
    axes[2].set_xlabel("share of the occlusion effect (%)")
    axes[2].set_title("where the decision comes from")
    fig.tight_layout()
    return fig


# ---- text ---------------------------------------------------------------------------------------

def selectivity_sentence(sel: dict[str, dict[str, np.ndarray]]) -> str:
    parts = [f"{layer}: median CV {np.median(s['cv']):.2f}, median selectivity index {np.median(s['si']):.2f}, "
             f"{int((s['si'] > 0.3).sum())}/{len(s['si'])} filters with index > 0.3"
             for layer, s in sel.items()]
    first, last = list(sel)[0], list(sel)[-1]
    a, b = np.median(sel[first]["si"]), np.median(sel[last]["si"])
    if b > 1.5 * a:
        verdict = (f"{last} filters are far more class-specific than {first} filters ({b:.2f} vs {a:.2f}): "
                   "early filters respond to generic colour and edge patterns present in every class, late "
                   "filters to class evidence.")
    elif b > a:
        verdict = f"{last} filters are somewhat more class-specific than {first} filters ({b:.2f} vs {a:.2f})."
    else:
        verdict = f"{last} filters are not more class-specific than {first} filters here ({b:.2f} vs {a:.2f})."
    return "; ".join(parts) + ". " + verdict


def shortcut_sentence(diag) -> str:
    m = diag.metrics
    if "aligned_acc" not in m:
        return f"Val accuracy {m['acc']:.1f} %; the dataset has no digit labels (run `data annotate`)."
    gap, half = gap_interval(m)
    text = (f"Val accuracy {m['acc']:.1f} %: digit-aligned {m['aligned_acc']:.1f} %, digit-conflicting "
            f"{m['conflicting_acc']:.1f} % (gap {gap:+.1f} ± {half:.1f} points, 95 %). The same images with the "
            f"digit set to the label score {diag.counterfactual['cf_aligned_acc']:.1f} %, with another digit "
            f"{diag.counterfactual['cf_conflicting_acc']:.1f} %. Swapping only the digit "
            f"changes {diag.digit_swap_flip_rate:.1f} % of predictions; {diag.follows_digit_rate:.1f} % of "
            f"conflicting images are predicted as their digit (10 % would be chance). Painting the digit gray gives "
            f"{diag.digit_blanked_acc:.1f} %, painting the CIFAR image gray {diag.cifar_blanked_acc:.1f} %. "
            f"The CIFAR patch carries {diag.quadrant_share['CIFAR patch']:.0f} % of the occlusion effect, the digit "
            f"patch {diag.quadrant_share['digit patch']:.0f} %.")
    cf_gap = diag.counterfactual["cf_aligned_acc"] - diag.counterfactual["cf_conflicting_acc"]
    relies = (gap - half > 0 and gap > 2) or cf_gap > 2 or diag.digit_swap_flip_rate > 10
    return text + (" The model relies on the digit shortcut." if relies
                   else " The model does not measurably rely on the digit shortcut.")


# ---- sweep --------------------------------------------------------------------------------------

def sweep_pages(report: Report, study_name: str, storage: str | None) -> None:
    import optuna

    from .storage import open_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:  # no such study (no sweep yet): no sweep pages; an unreachable storage is an error
        return
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    done = trials[trials["state"] == "COMPLETE"].sort_values("value", ascending=False)
    if done.empty:
        return
    top = done.head(8)
    cols = ["number", "value"] + [c for c in top.columns if c.startswith("params_")]
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.35 * len(top)))
    ax.axis("off")
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in top[cols].itertuples(index=False)]
    table = ax.table(cellText=cells, colLabels=[c.removeprefix("params_").split(".")[-1] for c in cols], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    ax.set_title(f"study {study_name}: best trials by val accuracy")
    fig.tight_layout()
    report.add("sweep_best_trials", fig, f"{len(done)} complete of {len(trials)} trials.")
    ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    report.add("sweep_history", ax.figure, "Objective of every trial and the best so far.")
    if len(done) >= 3:
        try:
            imp = optuna.importance.get_param_importances(study)
            fig, ax = plt.subplots(figsize=(7, 3.4))
            ax.barh(list(imp)[::-1], list(imp.values())[::-1], color="tab:green")
            ax.set_xlabel("importance (fANOVA)")
            fig.tight_layout()
            top_param = next(iter(imp))
            report.add("sweep_importances", fig, f"Most important parameter: {top_param} ({imp[top_param]:.2f}).")
        except (RuntimeError, ValueError):
            pass


def compare_pages(report: Report, folder: Path) -> None:
    """The shortcut-strength comparison's plots, when `folder` holds one (`shortcut-study compare`)."""
    from .compare_results import read_summary, strength_figures, strength_sentence

    if not (folder / "summary.csv").is_file():
        return
    summary = read_summary(folder / "summary.csv")
    text = strength_sentence(summary)
    for name, fig in strength_figures(summary).items():
        report.add(f"compare_{name}", fig, text if name.startswith("conflicting") else
                   "Mean over seeds with 95 % Student-t intervals; a missing point is a cell not yet run.")


# ---- the report ---------------------------------------------------------------------------------

def _checkpoint_and_run(checkpoint: str | Path | None, out: Path) -> tuple[Path, dict]:
    info_path = out / "best_run.json"
    info = read_json(info_path, "best_run.json record", "remove it or export again with `make best`") if info_path.is_file() else {}
    if checkpoint is None:
        checkpoint = out / "q1_model.pt"
        if not checkpoint.is_file():
            raise UserError(f"no model at {checkpoint}: run `make sweep` and `make best` first, or pass --checkpoint PATH")
        return checkpoint, info
    return Path(checkpoint), {}


def build_report(checkpoint: str | Path | None = None, data: str | Path = "data/course", out: str | Path = "results",
                 history: str | Path | None = None, study: str | None = "shortcut", storage: str | None = None,
                 tracking_uri: str | None = None, layers: tuple[str, ...] = ("conv1", "conv5"),
                 max_images: int = 5000, tta: str = "auto") -> str:
    """Figures and report.pdf. Figures analyse the model on single views; the headline adds the
    accuracy with test-time augmentation (`tta`, default: the run's own, as in its q1_test.txt)."""
    out = require_writable(out, "folder")
    ckpt, run_info = _checkpoint_and_run(checkpoint, out)
    rt = resolve_runtime()
    unknown = [layer for layer in layers if layer not in LAYERS]
    if unknown or not layers:
        raise UserError(f"--layers {','.join(layers)}: choose among {','.join(LAYERS)}")
    history_frame = _read_history(Path(history)) if history else None  # checked before any figure is written
    model, cfg = Run.of(ckpt).load(rt.device, ckpt)
    geom = cfg.geometry  # the run's own patch boxes and canvas
    val = load_split(data, "val", geom.canvas)
    rep = Report(out)
    try:
        val_metrics, val_preds = evaluate_split(model, val, rt, geom=geom, crossed=False)  # diagnostics cross a sample
        rep.headline.append(f"Checkpoint: {ckpt}" + (f" (MLflow run {run_info['run_id']})" if run_info.get("run_id") else ""))
        rep.headline.append(f"Val accuracy {val_metrics['acc']:.2f} % on {len(val)} images"
                            + (f"; digit-aligned {val_metrics['aligned_acc']:.2f} %, digit-conflicting "
                               f"{val_metrics['conflicting_acc']:.2f} %" if "aligned_acc" in val_metrics else ""))
        # No test folder: no test pages. A test folder that cannot be read (a malformed
        # test_labels.csv, say) is an error, not a silently shorter report.
        test = load_split(data, "test", geom.canvas) if any((Path(data) / d).is_dir() for d in TEST_DIRS) else None
        if test is not None and test.has_labels:
            test_metrics, test_preds = evaluate_split(model, test, rt, geom=geom)
            rep.headline.append(f"Test accuracy {test_metrics['acc']:.2f} % ({rubric_band(test_metrics['acc'])})"
                                + (f"; digit-conflicting {test_metrics['conflicting_acc']:.2f} %" if "conflicting_acc" in test_metrics else "")
                                + (f"; worst (class, digit) group {test_metrics['worst_group_acc']:.2f} %, mean over "
                                   f"the 100 groups {test_metrics['mean_group_acc']:.2f} % (crossed test)"
                                   if "worst_group_acc" in test_metrics else ""))
        tta = cfg.train.tta if tta == "auto" else tta
        if tta != "none":
            scored = [("val", val)] + ([("test", test)] if test is not None and test.has_labels else [])
            accs = [f"{name} {evaluate_split(model, split, rt, tta=tta, geom=geom, crossed=False)[0]['acc']:.2f} %"
                    for name, split in scored]
            rep.headline.append(f"With test-time augmentation '{tta}' (as in q1_test.txt): {', '.join(accs)}; "
                                "the figures analyse single views")

        rgb, chans = conv1_filter_figures(model)
        rep.add("conv1_filters_rgb", rgb, "All 16 conv1 filters as RGB images. Look for oriented edges and colour "
                "blobs: the low-level features every class shares.")
        rep.add("conv1_filters_channels", chans, "The same filters per input channel.")

        norms = class_activation_norms(model, val, rt, layers, geom=geom)
        sel = {layer: selectivity(n) for layer, n in norms.items()}
        for layer, n in norms.items():
            for i in range(n.shape[1]):
                rep.add(f"norms_{layer}_filter{i:02d}", filter_bar(n, layer, i), in_pdf=False)
            for start in range(0, n.shape[1], 16):
                count = min(16, n.shape[1] - start)
                rep.add(f"norms_{layer}_overview_{start:02d}", norms_overview(n, layer, start, count),
                        f"{layer}: median selectivity index {np.median(sel[layer]['si']):.2f} over {n.shape[1]} filters.")
            rep.add(f"norms_{layer}_heatmap", norms_heatmap(n, layer),
                    f"{layer}: each filter's class-wise norm divided by its mean over classes; "
                    f"uniform columns mean class-agnostic filters.")
        rep.add("selectivity", selectivity_figure(sel), selectivity_sentence(sel))

        rep.add("confusion_val", confusion_figure(confusion(val_preds, val.labels.numpy()), "val confusion matrix"),
                f"Worst class on val: {val_metrics['worst_class_acc']:.1f} %.")
        if test is not None and test.has_labels:
            rep.add("confusion_test", confusion_figure(confusion(test_preds, test.labels.numpy()), "test confusion matrix"),
                    f"Worst class on test: {test_metrics['worst_class_acc']:.1f} %.")
        if history_frame is None:
            hist_path = Run.of(ckpt).history_path
            if not hist_path.is_file() and run_info.get("run_id"):
                hist_path = _download_history(run_info["run_id"], tracking_uri, out)
            history_frame = _read_history(hist_path) if hist_path and hist_path.is_file() else None
        if history_frame is not None:
            rep.add("training_curves", curves_figure(history_frame), "Training loss and accuracies per epoch.")

        if val.has_digits:
            diag = shortcut_diagnostics(model, val, rt, geom, max_images=max_images)
            rep.add("shortcut_diagnostics", shortcut_figure(diag, geom), shortcut_sentence(diag))
            rep.headline.append(f"Digit swap flips {diag.digit_swap_flip_rate:.1f} % of predictions; CIFAR patch share "
                                f"of the decision {diag.quadrant_share['CIFAR patch']:.0f} %")
        if study:
            sweep_pages(rep, study, storage)
        compare_pages(rep, out / "compare")
        rep.publish()
    except BaseException:
        rep.discard()
        raise
    if run_info.get("run_id"):
        _log_to_mlflow(run_info["run_id"], tracking_uri, out, study)
    return "\n".join(rep.headline + [f"wrote {out / 'report.pdf'} ({len(rep.pages) + 1} pages) and {rep.count} "
                                      f"figures in {out / 'figures'}"])


def _read_history(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"history file not found: {path} — pass the run's history.csv or drop --history")
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a CSV ({str(exc).strip().splitlines()[0][:120]}) — pass the run's history.csv") from None
    missing = {"epoch", "train_loss"} - set(frame.columns)
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(sorted(missing))} — pass the run's history.csv")
    return frame


def _download_history(run_id: str, tracking_uri: str | None, out: Path) -> Path | None:
    import mlflow

    from .tracking import DEFAULT_TRACKING_URI

    try:
        mlflow.set_tracking_uri(tracking_uri or DEFAULT_TRACKING_URI)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="history.csv", dst_path=str(out / ".cache")))
    except Exception:
        return None


def _log_to_mlflow(run_id: str, tracking_uri: str | None, out: Path, study: str | None) -> None:
    from mlflow.tracking import MlflowClient

    from .tracking import init_tracking

    try:
        init_tracking(tracking_uri, study or "shortcut")
        client = MlflowClient()
        client.log_artifact(run_id, str(out / "report.pdf"), "report")
        client.log_artifacts(run_id, str(out / "figures"), "report/figures")
    except Exception as exc:
        print(f"note: report not logged to MLflow run {run_id}: {str(exc)[:120]}")
