"""Results measured in parts: some seeds or cells today, the rest on another day or machine.

Every finished run leaves one JSON record, written atomically and named by what it measured, that
holds the part which ran it, that part's machine line and commit, its start and end, and its
training losses. A table is aggregated from the records alone (committed with the results), never
only from a live database, and says which parts it holds. The benchmark (`benchmark.py`) and the
strength study (`compare.py`) both keep their runs this way.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import NUM_CLASSES
from .errors import read_json, write_text_atomic
from .registry import METHODS

SHARED_BASE = "erm"  # the method whose trained models the post-hoc methods refit (`shared_run` in their records)


def refit_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The entries of `methods` not trained on their own: a post-hoc method (DFR) beside ERM refits
    the last layer of ERM's model (its paper's base model) instead of training another ERM model."""
    if SHARED_BASE not in methods:
        return ()
    return tuple(m for m in methods if m in METHODS and METHODS[m].post_hoc)


def default_part_name() -> str:
    """What a command measures when it is not named: the host and the date."""
    return f"{socket.gethostname()}-{dt.date.today():%Y%m%d}"


def write_record(path: Path, record: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_records(folder: Path, what: str, pattern: str = "*.json") -> list[dict[str, Any]]:
    """Every record in `folder` (none when it does not exist yet)."""
    return [read_json(p, what, "remove it, or rerun the part that wrote it") for p in sorted(folder.glob(pattern))]


def losses_of(history: list[dict[str, Any]]) -> dict[str, float]:
    """The training-loss fields `not_converged` judges, from a run's per-epoch history, and the
    steps whose gradient `train.grad_clip` scaled down (0: the run is what it would be unclipped)."""
    losses = [h["train_loss"] for h in history]
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1], "train_loss_max": max(losses),
            "clipped_steps": sum(int(h.get("clipped_steps", 0)) for h in history)}


# A selected model within this many points of chance on digit-aligned and digit-conflicting test
# images alike uses neither the image nor the digit: collapsed. (2 points: about two binomial
# standard deviations of chance on the ~1,000 aligned images of a 10,000-image test set.)
COLLAPSE_MARGIN = 2.0


# What `not_converged` names, for the tables that leave such runs out.
DEFECT_RULE = ("training loss ended above its first epoch's (diverged) or rose above it on the way (loss spiked), "
               "or its selected model is at chance on digit-aligned and digit-conflicting images alike (collapsed)")


def not_converged(record: dict[str, Any]) -> str | None:
    """Why a run is a recipe defect rather than a data point, or None: its training loss ended
    above its first epoch's, or rose above it on the way (a spike it may have come back from with
    the model at chance: a loss that ends lower says nothing about the epochs between), or the
    model it selected is at chance with and without the digit's help (e.g. an epoch-1 model that a
    spike inside that epoch left predicting one class, kept by a tie of the selection rule)."""
    if record["train_loss_last"] > record["train_loss_first"]:
        return "diverged"
    if record.get("train_loss_max", -math.inf) > record["train_loss_first"]:
        return "loss spiked"
    test, chance = record.get("test", {}), 100.0 / NUM_CLASSES
    if all(abs(test.get(k, math.nan) - chance) <= COLLAPSE_MARGIN for k in ("aligned_acc", "conflicting_acc")):
        return "collapsed"
    return None


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of the (start, end) intervals ran: a part's wall time, so
    that one resumed in a later sitting does not count the hours between its sittings."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def part_lines(records: list[dict[str, Any]], unit: str) -> list[str]:
    """A line per part: its runs, commits, wall time while any of its runs ran, summed training
    time, and the machine it ran on."""
    parts: dict[str, dict[str, Any]] = {}
    for n, r in enumerate(records):
        p = parts.setdefault(r["part"], {"machine": r["machine"], "runs": 0, "trainings": {}, "intervals": [],
                                         "commits": []})
        p["runs"] += 1
        # Records of one training run (rules sharing it, a refit of its model) name it: counted once,
        # by the record that holds its time (a refit's holds 0), whichever is read first.
        key = r.get("training", n)
        p["trainings"][key] = max(p["trainings"].get(key, 0.0), r["train_seconds"])
        p["intervals"].append((r["started"], r["ended"]))
        if r["commit"] not in p["commits"]:
            p["commits"].append(r["commit"])
    return [f"- `{name}` ({p['runs']} {unit}, commit {', '.join(p['commits'])}, "
            f"{busy_seconds(p['intervals']) / 60:.1f} min of wall time while its runs ran, "
            f"{sum(p['trainings'].values()) / 60:.1f} min of training): {p['machine']}"
            for name, p in sorted(parts.items())] \
        or ["- none yet"]
