"""The shortcut-strength comparison's results: a row per cell, the aggregate per (method,
agreement, digit size) with a 95 % Student-t interval over seeds, the Markdown table and the
three plots (`compare.py` runs the cells and writes these; `report.py` draws the plots on a page of
its own). Cells not finished are shown as missing, never as zero; a cell that did not converge
is named, never averaged in. Plain data in, tables out: no grid object, no storage."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from .errors import UserError
from .metrics import METRICS as DECLARED
from .metrics import seed_interval
from .parts import DEFECT_RULE, SHARED_BASE, not_converged

# The test metrics aggregated per cell (a finished cell's trial holds every declared metric as a
# user attribute): those the metric table gives an interval over seeds.
METRICS = tuple(k for k, m in DECLARED.items() if m.interval)


def cell_key(params: dict[str, Any]) -> tuple[str, float, int, int] | None:
    """(method, agreement, digit size, seed) of a trial's parameters, as a grid's Cell holds them."""
    try:
        return str(params["method"]), float(params["agreement"]), int(params["digit_size"]), int(params["seed"])
    except (KeyError, TypeError, ValueError):
        return None


def cell_table(records: list[dict[str, Any]], trials: list[optuna.trial.FrozenTrial],
               cells: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per grid cell (`cells`: their params, in order): complete with its test metrics when
    a part left its record; else the state its trial has in the storage (running, waiting, failed),
    or missing. `not_converged` names a complete cell that diverged, spiked or collapsed (`parts.not_converged`)."""
    done = {cell_key(r): r for r in records}
    rank = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.WAITING: 1, TrialState.FAIL: 0}
    by_cell: dict[tuple, optuna.trial.FrozenTrial] = {}
    for t in trials:
        key = cell_key(t.params)
        held = by_cell.get(key)
        if key is not None and (held is None or rank.get(t.state, 0) > rank.get(held.state, 0)):
            by_cell[key] = t
    rows = []
    for params in cells:
        key = cell_key(params)
        record, t = done.get(key), by_cell.get(key)
        if record is not None:
            state = "complete"
        else:
            state = "missing" if t is None or t.state == TrialState.COMPLETE else {
                TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(t.state, "failed")
        row: dict[str, Any] = {**params, "state": state, "trial": t.number if t else None,
                               "not_converged": _defect(record, done) if record else ""}
        for metric in METRICS:
            row[metric] = float(record["test"].get(metric, math.nan)) if record else math.nan
        for key2 in ("seconds", "rarest_cell", "part", "clipped_steps"):
            row[key2] = record.get(key2) if record else None
        rows.append(row)
    return pd.DataFrame(rows)


def _defect(record: dict[str, Any], done: dict[tuple, dict[str, Any]]) -> str:
    """`not_converged` of a cell's record; a refit of another cell's model (`shared_run`, DFR's of
    the ERM cell) inherits its base's defect, since it refits that very model."""
    own = not_converged(record)
    if own or "shared_run" not in record:
        return own or ""
    base = done.get((SHARED_BASE, *cell_key(record)[1:]))  # the same agreement, digit size and seed
    why = not_converged(base) if base else None
    return f"refit of {record['shared_run']}, which {why}" if why else ""


def seed_summary(cells: pd.DataFrame, seeds: int) -> pd.DataFrame:
    """Per (method, agreement, digit size): seeds finished (and converged) of `seeds`, then mean / sd /
    95 % interval of every metric over those seeds."""
    rows = []
    for (method, agreement, digit), group in cells.groupby(["method", "agreement", "digit_size"], sort=False):
        done = group[(group["state"] == "complete") & (group["not_converged"].fillna("") == "")]
        row: dict[str, Any] = {"method": method, "agreement": agreement, "digit_size": digit,
                               "seeds_done": len(done), "seeds": seeds}
        for key in METRICS:
            mean, sd, lo, hi = seed_interval(done[key].to_numpy(dtype=float))
            row |= {f"{key}_mean": mean, f"{key}_sd": sd, f"{key}_ci_low": lo, f"{key}_ci_high": hi}
        rows.append(row)
    return pd.DataFrame(rows)


# The final recipe's convergence bar (issue 22): ERM on data without a shortcut (agreement 0.1)
# reaches this test accuracy, %; below it the grid describes an undertrained network.
NO_SHORTCUT_ERM_BAR = 75.0

# The columns whose interval the Markdown table prints (every interval is in summary.csv).
INTERVAL_SHOWN = ("conflicting_acc", "gap", "worst_group_acc")


def _fmt(row: pd.Series, key: str) -> str:
    mean, sd = row[f"{key}_mean"], row[f"{key}_sd"]
    if not math.isfinite(mean):
        return "missing"
    text = f"{mean:.1f}" + (f" ± {sd:.1f}" if math.isfinite(sd) else "")
    if key in INTERVAL_SHOWN and math.isfinite(row[f"{key}_ci_low"]):
        text += f" [{row[f'{key}_ci_low']:.1f}, {row[f'{key}_ci_high']:.1f}]"
    return text


def _bar_line(r: pd.Series) -> str:
    """ERM without a shortcut against the recipe's bar: the mean to two decimals (one would round
    74.95 up to the bar it misses) and its interval, which may hold the bar when the mean does not."""
    bar, mean, lo, hi = NO_SHORTCUT_ERM_BAR, r["acc_mean"], r["acc_ci_low"], r["acc_ci_high"]
    interval = f" [{lo:.1f}, {hi:.1f}]" if math.isfinite(lo) else ""
    held = "; its interval holds the bar" if mean < bar and math.isfinite(lo) and lo <= bar <= hi else ""
    return (f"- erm, {r['digit_size']} px, agreement 0.1: overall {mean:.2f}{interval} over {r['seeds_done']} "
            f"seed(s) — the recipe's bar, ≥ {bar:g} %, is {'met' if mean >= bar else 'NOT met'} by the mean{held}")


def _cell_lines(cells: pd.DataFrame, what: Callable[[pd.Series], Any]) -> list[str]:
    """One Markdown list line per cell: its method, agreement, digit size, seed and `what`."""
    return [f"- {r['method']} a={r['agreement']:g} d={r['digit_size']} seed={r['seed']}: {what(r)}"
            for _, r in cells.iterrows()]


def summary_markdown(summary: pd.DataFrame, cells: pd.DataFrame, weakest: float) -> str:
    """The table, the no-shortcut check at the `weakest` agreement, the rarest (class, digit) cell
    per dataset and the cells that did not converge."""
    titles = [DECLARED[k].title + (" [95 % CI]" if k in INTERVAL_SHOWN else "") for k in METRICS]
    lines = ["| method | agreement | digit px | seeds | " + " | ".join(titles) + " |",
             "|" + "---|" * (4 + len(METRICS))]
    for _, r in summary.iterrows():
        seeds = f"{r['seeds_done']}/{r['seeds']}"
        lines.append(f"| {r['method']} | {r['agreement']:g} | {r['digit_size']} | {seeds} | "
                     + " | ".join(_fmt(r, k) for k in METRICS) + " |")
    checks = []
    for _, r in summary[summary["agreement"] == weakest].iterrows():
        lo, hi = r["gap_ci_low"], r["gap_ci_high"]
        if weakest <= 0.1 + 1e-9 and math.isfinite(lo):
            inside = lo <= 0 <= hi
            checks.append(f"- {r['method']}, {r['digit_size']} px, agreement 0.1 (no shortcut): gap "
                          f"{r['gap_mean']:.1f} [{lo:.1f}, {hi:.1f}] — {'no gap beyond its interval' if inside else 'a gap beyond its interval'}")
        if weakest <= 0.1 + 1e-9 and r["method"] == "erm" and math.isfinite(r["acc_mean"]):
            checks.append(_bar_line(r))
    done = int((cells["state"] == "complete").sum())
    rarest = cells.dropna(subset=["rarest_cell"]).groupby(["agreement", "digit_size"])["rarest_cell"].min()
    rarest_lines = [f"- agreement {a:g}, digit {d} px: {int(n)}" for (a, d), n in rarest.items()]
    clipped_lines = _cell_lines(cells[cells["clipped_steps"].fillna(0) > 0], lambda r: int(r["clipped_steps"]))
    defect_lines = _cell_lines(cells[cells["not_converged"].fillna("") != ""], lambda r: r["not_converged"])
    return "\n".join([f"{done} of {len(cells)} cells finished; mean ± sd over seeds, 95 % Student-t interval in "
                      "brackets (two or more seeds). Test accuracy (%) on the unbiased test set.", "", *lines,
                      *(["", "No-shortcut cells (the gap should be zero within its interval; ERM should reach the recipe's bar):",
                         *checks] if checks else []),
                      *(["", "Training images in the rarest (class, digit) cell of each dataset:", *rarest_lines]
                        if rarest_lines else []),
                      "", f"Cells whose {DEFECT_RULE}, or refits of such a cell's model (a recipe defect, not a "
                      "result; not averaged in): "
                      + ("none" if not defect_lines else ""), *defect_lines,
                      "", "Cells with optimizer steps whose gradient norm `train.grad_clip` scaled down (the others "
                      "trained as without it): " + ("none" if not clipped_lines else ""), *clipped_lines])


def strength_figures(summary: pd.DataFrame) -> dict[str, Any]:
    """Three figures, a panel per digit size, a line per method with 95 % interval error bars:
    conflicting accuracy, the aligned-conflicting gap and overall accuracy vs the agreement rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    sizes = sorted(summary["digit_size"].unique(), reverse=True)
    for name, key, ylabel in (("conflicting_vs_agreement", "conflicting_acc", "conflicting test accuracy (%)"),
                              ("gap_vs_agreement", "gap", "aligned − conflicting accuracy (points)"),
                              ("overall_vs_agreement", "acc", "overall test accuracy (%)")):
        fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.2), squeeze=False, sharey=True)
        for ax, size in zip(axes[0], sizes):
            panel = summary[summary["digit_size"] == size]
            for method, rows in panel.groupby("method", sort=False):
                rows = rows.sort_values("agreement")
                ok = rows[np.isfinite(rows[f"{key}_mean"])]
                err = np.nan_to_num(np.vstack([ok[f"{key}_mean"] - ok[f"{key}_ci_low"],
                                               ok[f"{key}_ci_high"] - ok[f"{key}_mean"]]))
                ax.errorbar(ok["agreement"], ok[f"{key}_mean"], yerr=err, marker="o", capsize=3, label=method)
            if key == "gap":
                ax.axhline(0, color="gray", lw=0.8)
            ax.set_title(f"digit {size} px")
            ax.set_xlabel("training agreement rate (digit = label)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(f"{DECLARED[key].title} vs shortcut strength (mean over seeds, 95 % interval)", fontsize=10)
        fig.tight_layout()
        figures[name] = fig
    return figures


def read_summary(path: Path) -> pd.DataFrame:
    """A summary.csv written by `write_results`, checked."""
    try:
        summary = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"cannot read {path}: {str(exc)[:120]} — rewrite it with `shortcut-study compare --aggregate`") from None
    need = {"method", "agreement", "digit_size", "seeds_done"} | {f"{k}_{s}" for k in METRICS
                                                               for s in ("mean", "ci_low", "ci_high")}
    if not need <= set(summary.columns):
        raise UserError(f"{path} is not a comparison summary (columns missing: {', '.join(sorted(need - set(summary.columns)))[:120]})"
                        " — rewrite it with `shortcut-study compare --aggregate`")
    return summary


def strength_sentence(summary: pd.DataFrame) -> str:
    """Per method and digit size: conflicting accuracy at the weakest and the strongest shortcut."""
    parts = []
    for (method, size), rows in summary.groupby(["method", "digit_size"], sort=False):
        rows = rows[np.isfinite(rows["conflicting_acc_mean"])].sort_values("agreement")
        if len(rows) >= 2:
            lo, hi = rows.iloc[0], rows.iloc[-1]
            parts.append(f"{method} ({size} px): {lo['conflicting_acc_mean']:.1f} % at agreement {lo['agreement']:g} "
                         f"-> {hi['conflicting_acc_mean']:.1f} % at {hi['agreement']:g}")
    return ("Conflicting test accuracy as the shortcut strengthens: " + "; ".join(parts) + ".") if parts else \
        "Too few finished cells for a trend yet."
