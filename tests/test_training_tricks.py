"""The levers of the training loop: whitened first-layer init, lookahead, evaluating every N epochs,
gradient clipping."""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from shortcut_study.augment import normalize
from shortcut_study.config import make_config
from shortcut_study.data.layout import load_split
from shortcut_study.lookahead import Lookahead
from shortcut_study.train import fit
from shortcut_study.whiten import whiten_conv


def test_whitened_filters_decorrelate_the_patches():
    g = torch.Generator().manual_seed(0)
    # Correlated images: smooth noise, so neighbouring pixels and channels co-vary.
    smooth = F.avg_pool2d(torch.rand(64, 3, 44, 44, generator=g), 5, stride=1)
    images = (smooth * 255).to(torch.uint8)
    conv = nn.Conv2d(3, 16, kernel_size=7, padding=3)
    whiten_conv(conv, images)
    assert torch.allclose(conv.weight[:8], -conv.weight[8:]) and not conv.bias.any()
    with torch.no_grad():
        out = F.conv2d(normalize(images), conv.weight[:8])  # valid positions: the patches it saw
    feats = out.permute(1, 0, 2, 3).reshape(8, -1)
    cov = feats @ feats.T / feats.shape[1]
    assert torch.allclose(cov.diag(), torch.ones(8), atol=0.05)
    assert (cov - torch.diag(cov.diag())).abs().max() < 0.05


def test_lookahead_ends_on_the_slow_weights_and_round_trips():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    la = Lookahead(model, total_steps=20, decay=0.9, every=5)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    for step in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        la.step()
        if step == 9:
            saved = {k: v.clone() for k, v in la.state_dict()["slow"].items()}
            steps = la.state_dict()["steps"]
    assert all(torch.equal(la.slow[k], v) for k, v in model.state_dict().items())
    again = Lookahead(model, total_steps=20, decay=0.9)
    again.load_state_dict({"steps": steps, "slow": saved})
    assert again.steps == 10 and torch.equal(again.slow["weight"], saved["weight"])


def test_eval_every_scores_some_epochs_and_always_the_last(dataset, tmp_path):
    cfg = make_config(sets=["train.batch_size=32", "train.epochs=3", "train.eval_batch_size=64", "train.eval_every=2"])
    result = fit(cfg, dataset, tmp_path / "run", quiet=True)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert hist["val_acc"].notna().tolist() == [False, True, True]
    assert result.best_epoch in (2, 3) and (tmp_path / "run" / "q1_model.pt").is_file()


def test_onecycle_on_a_run_of_two_steps_trains(dataset, tmp_path):
    """F6: OneCycleLR on a very short run used to divide by zero."""
    cfg = make_config(sets=["train.schedule=onecycle", "train.epochs=1", "train.subset=64", "train.batch_size=32",
                            "augment.digit_shuffle_p=0", "train.tta=none"])
    assert fit(cfg, dataset, tmp_path / "r", quiet=True).history


def test_gradient_clipping_acts_only_above_its_bound_and_is_counted(dataset, tmp_path):
    """A bound no step reaches leaves the run exactly as unclipped (same weights, bit for bit); a
    bound every step exceeds clips every step, and each epoch's `clipped_steps` says so."""
    base = ["train.batch_size=32", "train.epochs=2", "train.eval_batch_size=64", "train.precision=fp32",
            "train.threads=1"]

    def run(name: str, clip: str) -> tuple[dict, pd.DataFrame]:
        fit(make_config(sets=[*base, f"train.grad_clip={clip}"]), dataset, tmp_path / name, quiet=True)
        weights = torch.load(tmp_path / name / "last.pt", weights_only=False)["model"]
        return weights, pd.read_csv(tmp_path / name / "history.csv")

    plain, plain_hist = run("plain", "0")
    loose, loose_hist = run("loose", "1e9")
    tight, tight_hist = run("tight", "1e-6")
    assert all(torch.equal(plain[k], loose[k]) for k in plain)
    assert plain_hist["clipped_steps"].tolist() == [0, 0] and loose_hist["clipped_steps"].tolist() == [0, 0]
    steps = len(load_split(dataset, "train")) // 32
    assert tight_hist["clipped_steps"].tolist() == [steps, steps]
    assert not all(torch.equal(plain[k], tight[k]) for k in plain)


def test_clipped_steps_of_jtts_identification_run_count_with_the_first_epoch(dataset, tmp_path):
    cfg = make_config(sets=["train.batch_size=32", "train.epochs=2", "train.eval_batch_size=64", "train.threads=1",
                            "train.grad_clip=1e-6", "train.method=jtt", "method.identify_epochs=1",
                            "augment.digit_shuffle_p=0"])
    fit(cfg, dataset, tmp_path / "jtt", quiet=True)
    steps = len(load_split(dataset, "train")) // 32  # JTT's fixed epoch: N images, as every method's
    assert pd.read_csv(tmp_path / "jtt" / "history.csv")["clipped_steps"].tolist() == [2 * steps, steps]
