"""`bench`: a table of training speed and accuracy on this machine, written as CSV and Markdown.

Rows: the reference pipeline (PIL + torchvision v2 + DataLoader), the fast on-device loop (bf16,
fp32, torch.compile), and full training runs of the presets (`fast`, `best`, `erm`). `--quick`
measures throughput only.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import REPO_ROOT, Config, make_config
from .data.layout import load_split
from .errors import atomic_path, write_text_atomic
from .diagnostics import counterfactual_digit_accuracy
from .evaluate import evaluate_split, gap_interval
from .methods import METHODS
from .model import CNN, load_model
from .runtime import resolve_runtime
from .train import (FolderDataset, fast_batches, fit, load_data, make_optimizer, reference_batches, reference_transform,
                    step_module)

BENCH_DIR = REPO_ROOT / "experiments" / "bench"


def measure_throughput(cfg: Config, data: str | Path, steps: int, warmup: int = 20) -> tuple[float, int]:
    """Training images/s over `steps` optimizer steps (after `warmup`), data loading included, and
    the number of training images (one epoch)."""
    warmup = min(warmup, steps)  # tiny runs (tests) warm up for no longer than they measure
    t = cfg.train
    rt = resolve_runtime(t.device, t.precision, t.channels_last)
    torch.manual_seed(t.seed)
    train, _ = load_data(cfg, data, rt)
    model = CNN().to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    method = METHODS[t.method]
    stepper = step_module(model, cfg)
    if t.pipeline == "reference":
        loader = torch.utils.data.DataLoader(
            FolderDataset(Path(data), train.files, train.labels.cpu(), reference_transform(cfg)),
            batch_size=t.batch_size, shuffle=True, drop_last=True, num_workers=t.num_workers,
            persistent_workers=t.num_workers > 0)

        def batches():
            while True:
                yield from reference_batches(loader, cfg, rt)
    else:
        def batches():
            while True:
                yield from fast_batches(train, cfg, rt)
    seen, start = 0, None
    for i, (x, y) in enumerate(batches()):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        if i == warmup + steps:
            break
        with rt.autocast():
            loss, _ = method(stepper, rt.prepare(x), y, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start), len(train)


def profile_fast_loop(cfg: Config, data: str | Path, steps: int = 20) -> str:
    """Where the fast loop's time goes, by operator family (self CPU time under torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from .augment import augment_batch

    t = cfg.train
    rt = resolve_runtime(t.device, t.precision, t.channels_last)
    train, _ = load_data(cfg, data, rt)
    model = CNN().to(rt.device).to(memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    opt = make_optimizer(model, cfg)
    method = METHODS[t.method]

    def step(idx):
        with record_function("augmentation"):
            x = augment_batch(train.images[idx], cfg.augment, cfg.geometry)
        with rt.autocast():
            loss, _ = method(model, rt.prepare(x), train.labels[idx], t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("optimizer"):
            opt.step()

    bs = t.batch_size
    for i in range(3):
        step(torch.arange(i * bs, (i + 1) * bs) % len(train))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(torch.randint(0, len(train), (bs,)))
    # First match wins: backward names contain the forward ones ("mkldnn_convolution_backward").
    families = {"conv bwd": ("convolution_backward", "ConvolutionBackward"),
                "conv fwd": ("mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d"),
                "batch norm": ("batch_norm", "BatchNorm"),
                "pooling": ("max_pool", "adaptive_avg_pool", "avg_pool"), "relu": ("relu", "threshold")}
    totals = {k: 0.0 for k in (*families, "augmentation", "optimizer", "other")}
    events = prof.key_averages()
    for ev in events:
        name = ev.key
        if name in ("augmentation", "optimizer"):
            totals[name] += ev.cpu_time_total  # inclusive time of the labelled ranges
            continue
        if name.startswith("ProfilerStep"):
            continue
        fam = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        totals[fam] += ev.self_cpu_time_total
    # self time of ops inside the labelled ranges was counted twice; remove it from "other"
    whole = sum(ev.self_cpu_time_total for ev in events)
    totals["other"] = max(0.0, whole - sum(v for k, v in totals.items() if k != "other"))
    total = sum(totals.values()) or 1.0
    return "profile (fast loop, share of CPU time): " + ", ".join(f"{k} {v / total * 100:.0f} %" for k, v in totals.items())


def _minutes_to(history: list[dict[str, float]], target: float, with_eval: bool) -> float:
    """Minutes of training (and, with `with_eval`, per-epoch evaluation) until val acc >= target."""
    elapsed = 0.0
    for h in history:
        elapsed += h["train_seconds"] + (h["eval_seconds"] if with_eval else 0.0)
        if h["val_acc"] >= target:
            return elapsed / 60
    return math.nan


def full_row(label: str, preset: str, data: str | Path, out_root: Path, sets: list[str]) -> dict[str, float | str]:
    cfg = make_config(preset, sets)
    result = fit(cfg, data, out_root / preset, quiet=False)
    rt = resolve_runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last)
    test = load_split(data, "test", cfg.geometry.canvas)
    model = load_model(out_root / preset / "q1_model.pt", rt.device)
    tm: dict[str, float] = {}
    if test.has_labels:
        tm, _ = evaluate_split(model, test, rt, tta=cfg.train.tta, geom=cfg.geometry)
        tm.update(counterfactual_digit_accuracy(model, test, rt, cfg.geometry, tta=cfg.train.tta))
    epochs = len(result.history)
    return {"row": label, "preset": preset, "epochs": epochs, "images_per_s": result.images_per_s,
            "s_per_epoch": result.train_seconds / max(1, epochs), "train_min_to_75_val": _minutes_to(result.history, 75.0, False),
            "wall_min_to_75_val": _minutes_to(result.history, 75.0, True),
            "train_min": result.train_seconds / 60, "val_acc": result.best.get("acc", math.nan),
            "test_acc": tm.get("acc", math.nan), "test_aligned_acc": tm.get("aligned_acc", math.nan),
            "test_conflicting_acc": tm.get("conflicting_acc", math.nan),
            "test_gap_ci95": gap_interval(tm)[1] if "aligned_acc" in tm else math.nan,
            "test_cf_aligned_acc": tm.get("cf_aligned_acc", math.nan),
            "test_cf_conflicting_acc": tm.get("cf_conflicting_acc", math.nan)}


def _row(df: pd.DataFrame, label: str) -> pd.Series | None:
    rows = df[df["row"] == label]
    return rows.iloc[0] if len(rows) else None


def targets_section(df: pd.DataFrame) -> str:
    """Issue 8's targets against this run's rows, as a Markdown table (rows that did not run are skipped)."""
    lines = ["| target | measured | met |", "|---|---|---|"]

    def add(target: str, measured: str, met: bool) -> None:
        lines.append(f"| {target} | {measured} | {'yes' if met else 'no'} |")

    if (best := _row(df, "best (full run)")) is not None:
        acc = best["test_acc"]
        add("unbiased test accuracy ≥ 82 % (`best`, ≤ 40 epochs)", f"{acc:.2f} % in {best['epochs']:.0f} epochs",
            acc >= 82 and best["epochs"] <= 40)
        add("stretch: ≥ 85 %", f"{acc:.2f} %", acc >= 85)
        gap = best["test_aligned_acc"] - best["test_conflicting_acc"]
        add("digit-aligned vs digit-conflicting test accuracy within 1 point",
            f"{best['test_aligned_acc']:.2f} vs {best['test_conflicting_acc']:.2f} % (gap {gap:+.2f} "
            f"± {best['test_gap_ci95']:.2f}, 95 %)", abs(gap) <= 1)
        cf = best["test_cf_aligned_acc"] - best["test_cf_conflicting_acc"]
        add("the same, paired: every test image with its digit set to the label vs to another digit",
            f"{best['test_cf_aligned_acc']:.2f} vs {best['test_cf_conflicting_acc']:.2f} % (gap {cf:+.2f})", abs(cf) <= 1)
    if (fast := _row(df, "fast (full run)")) is not None:
        m = fast["train_min_to_75_val"]
        add("75 % val within 2 minutes of training (`fast`)",
            f"{m:.2f} min of training ({fast['wall_min_to_75_val']:.2f} min with per-epoch evaluation)"
            if math.isfinite(m) else f"not reached (best val {fast['val_acc']:.2f} %)", math.isfinite(m) and m <= 2)
    if (loop := _row(df, "fast loop (throughput)")) is not None:
        full = df[df["row"].str.endswith("(full run)")]["images_per_s"]
        also = f"; full runs' per-epoch medians {full.min():.0f}–{full.max():.0f}" if len(full) else ""
        add("training throughput ≥ 3,000 images/s", f"{loop['images_per_s']:.0f} images/s{also}",
            loop["images_per_s"] >= 3000)
    if (erm := _row(df, "erm (full run)")) is not None:
        add("`erm` shows the shortcut's cost (aligned ≫ conflicting)",
            f"test {erm['test_acc']:.2f} %: aligned {erm['test_aligned_acc']:.2f} %, conflicting "
            f"{erm['test_conflicting_acc']:.2f} %", erm["test_aligned_acc"] - erm["test_conflicting_acc"] > 5)
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    rt = resolve_runtime()
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {rt.describe()}"


def run_bench(data: str | Path, quick: bool = False, presets: tuple[str, ...] = ("fast", "best", "erm"),
              sets: list[str] | None = None, steps: int = 200, md: str | Path | None = None,
              out_dir: Path = BENCH_DIR, results: Path | None = None) -> str:
    """The benchmark table; with `results`, the `best` preset's model and test predictions go there."""
    sets = sets or []
    rows: list[dict[str, float | str]] = []
    base = make_config("best", sets)
    ref = make_config("best", sets + ["train.pipeline=reference"])
    for label, cfg, n_steps in (("reference pipeline", ref, max(10, steps // 2)), ("fast loop", base, steps),
                                ("fast loop fp32", make_config("best", sets + ["train.precision=fp32"]), steps),
                                ("fast loop torch.compile", make_config("best", sets + ["train.compile=true"]), steps)):
        ips, epoch_images = measure_throughput(cfg, data, steps=n_steps)
        rows.append({"row": f"{label} (throughput)", "preset": "best", "images_per_s": ips,
                     "s_per_epoch": epoch_images / ips})
    ref_ips, fast_ips = rows[0]["images_per_s"], rows[1]["images_per_s"]
    profile_line = profile_fast_loop(base, data)
    if not quick:
        out_root = out_dir / "runs"
        for preset in presets:
            rows.append(full_row(f"{preset} (full run)", preset, data, out_root, sets))
        if results is not None and "best" in presets:
            from .data.layout import split_dir
            from .evaluate import export_submission

            export_submission(out_root / "best" / "q1_model.pt", make_config("best", sets), split_dir(Path(data), "test"),
                              Path(results))
    df = pd.DataFrame(rows)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with atomic_path(out_dir / f"bench-{stamp}{'-quick' if quick else ''}.csv") as tmp:
        df.to_csv(tmp, index=False)
    table = df.to_markdown(index=False, floatfmt=".2f")
    text = "\n".join([f"machine: {machine_line()}", table, f"speed-up fast/reference: {fast_ips / ref_ips:.2f}x",
                      profile_line])
    if md:
        write_text_atomic(md, f"# Benchmark ({dt.date.today()}, `shortcut-study bench`)\n\n"
                              "Written by the command; the measurements behind the presets and what limits the "
                              "figures are in `evidence.md` beside this file.\n\n"
                              f"```\n{text}\n```\n\n## Against the targets\n\n{targets_section(df)}\n")
    return text

