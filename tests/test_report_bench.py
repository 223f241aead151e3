"""The report's figures and PDF, and the benchmark's quick mode, on a tiny model and dataset."""

from __future__ import annotations

import torch
from torch import nn

from shortcut_study.bench import run_bench
from shortcut_study.cli import main
from shortcut_study.config import NORM_MEAN, NORM_STD
from shortcut_study.data import load_split
from shortcut_study.data.layout import SplitData
from shortcut_study.diagnostics import class_activation_norms, selectivity, shortcut_diagnostics
from shortcut_study.evaluate import evaluate_split
from shortcut_study.model import load_model
from shortcut_study.report import build_report
from shortcut_study.runtime import resolve_runtime


def test_activation_norms_and_selectivity(trained_run, dataset):
    rt = resolve_runtime("cpu")
    model = load_model(trained_run / "q1_model.pt")
    norms = class_activation_norms(model, load_split(dataset, "val"), rt, ("conv1", "conv3", "conv5"))
    assert norms["conv1"].shape == (10, 16) and norms["conv3"].shape == (10, 48) and norms["conv5"].shape == (10, 80)
    assert (norms["conv1"] >= 0).all()
    s = selectivity(norms["conv5"])
    assert s["si"].shape == (80,) and ((s["si"] >= 0) & (s["si"] <= 1)).all()
    import numpy as np

    uniform = selectivity(np.ones((10, 4)))
    assert np.allclose(uniform["si"], 0) and np.allclose(uniform["cv"], 0)


def test_shortcut_diagnostics(trained_run, dataset):
    diag = shortcut_diagnostics(load_model(trained_run / "q1_model.pt"), load_split(dataset, "val"), resolve_runtime("cpu"))
    assert 0 <= diag.digit_swap_flip_rate <= 100 and 0 <= diag.digit_blanked_acc <= 100
    assert abs(sum(diag.quadrant_share.values()) - 100) < 1e-6 or sum(diag.quadrant_share.values()) == 0
    assert diag.occlusion_map.shape == (40, 40)


class DigitReader(nn.Module):
    """A pure shortcut model: predicts the digit painted (as gray level 20 * digit + 10) in the digit patch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x[:, 0, 32, 32].float() * NORM_STD[0] + NORM_MEAN[0]) * 255
        return nn.functional.one_hot(((level - 10) / 20).round().long().clamp(0, 9), 10).float()


class CifarPatchOnly(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, :, :24, :24])


def _painted_split(n: int = 200, digits: torch.Tensor | None = None) -> SplitData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    digits = torch.randint(0, 10, (n,), generator=g) if digits is None else digits
    images = torch.randint(0, 256, (n, 3, 40, 40), generator=g, dtype=torch.uint8)
    images[:, :, 24:, 24:] = (20 * digits + 10).to(torch.uint8)[:, None, None, None]
    return SplitData(images, labels, digits, [f"img_{i}.png" for i in range(n)])


def test_crossed_metrics_isolate_the_digit():
    rt = resolve_runtime("cpu")
    split = _painted_split()
    m, _ = evaluate_split(DigitReader(), split, rt, train_agreement=0.64)
    # a pure digit reader: right exactly on the crossed images whose digit is the label
    assert m["cf_aligned_acc"] == 100.0 and m["cf_conflicting_acc"] == 0.0 and m["cf_gap"] == 100.0
    assert m["worst_group_acc"] == 0.0 and abs(m["mean_group_acc"] - 10.0) < 1e-9
    assert abs(m["id_acc"] - 64.0) < 1e-9  # the crossed test at the training agreement
    assert torch.equal(split.images, _painted_split().images)  # the split itself is untouched
    torch.manual_seed(0)
    cifar_only = nn.Sequential(nn.Flatten(), nn.Linear(3 * 24 * 24, 10))
    blind, _ = evaluate_split(CifarPatchOnly(cifar_only), split, rt)
    assert blind["cf_aligned_acc"] == blind["cf_conflicting_acc"]  # same images but for the digit
    # every digit's cells alike: the worst cell is the worst class
    assert abs(blind["worst_group_acc"] - blind["worst_class_acc"]) < 1e-9
    unknown, _ = evaluate_split(DigitReader(), _painted_split(digits=torch.full((200,), -1)), rt)
    assert "worst_group_acc" not in unknown and "cf_gap" not in unknown and "acc" in unknown


def test_report_writes_pdf_and_every_figure(trained_run, dataset, tmp_path):
    out = tmp_path / "results"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "sweep_history.png").write_bytes(b"stale")  # from an earlier report with a sweep
    text = build_report(trained_run / "q1_model.pt", dataset, out, study=None, tta="flip_shift")
    assert "Val accuracy" in text and "Test accuracy" in text
    assert "With test-time augmentation 'flip_shift'" in text and "test " in text.split("flip_shift")[1]
    assert (out / "report.pdf").read_bytes()[:4] == b"%PDF"
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    assert "sweep_history" not in figures
    assert {f"norms_conv1_filter{i:02d}" for i in range(16)} <= figures
    assert {f"norms_conv5_filter{i:02d}" for i in range(80)} <= figures
    assert {"conv1_filters_rgb", "conv1_filters_channels", "norms_conv1_heatmap", "norms_conv5_heatmap",
            "selectivity", "confusion_val", "confusion_test", "training_curves", "shortcut_diagnostics"} <= figures


def test_report_without_a_run_says_what_to_do(dataset, tmp_path, capsys):
    assert main(["report", "--data", str(dataset), "--out", str(tmp_path / "empty"), "--study", ""]) == 2
    assert "make sweep" in capsys.readouterr().err


def test_bench_quick_prints_a_table(dataset, tmp_path):
    text = run_bench(dataset, quick=True, steps=2, out_dir=tmp_path,
                     sets=["train.batch_size=16", "train.num_workers=0"])
    assert "reference pipeline" in text and "fast loop" in text and "speed-up" in text and "profile" in text
    assert list(tmp_path.glob("bench-*-quick.csv"))


def test_bench_full_rows_train_and_grade(dataset, tmp_path):
    md = tmp_path / "bench.md"
    text = run_bench(dataset, quick=False, presets=("best", "default"), steps=2, out_dir=tmp_path, md=md,
                     results=tmp_path / "results", sets=["train.batch_size=16", "train.num_workers=0", "train.epochs=1"])
    assert "best (full run)" in text and "default (full run)" in text and md.read_text().startswith("# Benchmark")
    assert "## Against the targets" in md.read_text() and "paired" in md.read_text()
    assert "`make all` (preset `default`) ≥ 80 % test" in md.read_text() and "Targets for a CPU with" in md.read_text()
    assert len((tmp_path / "results" / "q1_test.txt").read_text().splitlines()) == 30
