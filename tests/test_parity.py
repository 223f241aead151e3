"""Parity with the methods' reference implementations on fixed random inputs. Each test re-states
the reference's lines (CPU instead of `.cuda()`) and checks that the method here computes the same
numbers: GroupDRO's loss and q, LfF's loss and moving averages, JTT's epoch composition, DFR's
averaged coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shortcut_study.batch import Batch
from shortcut_study.config import make_config
from shortcut_study.data.layout import SplitData
from shortcut_study.groups import group_ids
from shortcut_study.methods.base import TrainContext
from shortcut_study.registry import METHODS
from shortcut_study.runtime import resolve_runtime


class Slice(nn.Module):
    """A 'model' whose logits are columns of its input: fixed logits without a network."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start:self.stop]


def _split(n: int, seed: int = 0) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    digits = torch.where(torch.rand(n, generator=g) < 0.6, labels, torch.randint(0, 10, (n,), generator=g))
    return SplitData(torch.zeros(n, 3, 40, 40, dtype=torch.uint8), labels, digits, [f"{i}.png" for i in range(n)])


def _method(name: str, sets: list[str], train: SplitData, model: nn.Module, new_model=None, train_erm=None,
            predict=None):
    cfg = make_config(sets=[f"train.method={name}", *sets])
    ctx = TrainContext(cfg=cfg, train=train, rt=resolve_runtime("cpu"), data_dir="", new_model=new_model,
                       train_erm=train_erm, predict=predict)
    return METHODS[name](model, cfg.method, ctx)


# ---- GroupDRO: kohpangwei/group_DRO loss.py ------------------------------------------------------

class ReferenceLossComputer:
    """`LossComputer` of kohpangwei/group_DRO `loss.py` (is_robust=True, btl=False,
    normalize_loss=False): `compute_group_avg` and `compute_robust_loss`, line for line."""

    def __init__(self, n_groups, group_counts, adj, step_size):
        self.n_groups, self.group_counts, self.step_size = n_groups, group_counts, step_size
        self.adj = torch.full((n_groups,), float(adj))
        self.adv_probs = torch.ones(n_groups) / n_groups

    def compute_group_avg(self, losses, group_idx):
        group_map = (group_idx == torch.arange(self.n_groups).unsqueeze(1).long()).float()
        group_count = group_map.sum(1)
        group_denom = group_count + (group_count == 0).float()
        group_loss = (group_map @ losses.view(-1)) / group_denom
        return group_loss, group_count

    def compute_robust_loss(self, group_loss, group_count):
        adjusted_loss = group_loss
        if torch.all(self.adj > 0):
            adjusted_loss += self.adj / torch.sqrt(self.group_counts)
        self.adv_probs = self.adv_probs * torch.exp(self.step_size * adjusted_loss.data)
        self.adv_probs = self.adv_probs / (self.adv_probs.sum())
        robust_loss = group_loss @ self.adv_probs
        return robust_loss, self.adv_probs

    def loss(self, yhat, y, group_idx):
        per_sample_losses = nn.functional.cross_entropy(yhat, y, reduction="none")
        group_loss, group_count = self.compute_group_avg(per_sample_losses, group_idx)
        return self.compute_robust_loss(group_loss, group_count)[0]


@pytest.mark.parametrize("adjustment", [0.0, 2.0])
def test_groupdro_loss_and_q_match_group_dro_loss_py(adjustment):
    train = _split(2000)
    ours = _method("groupdro", ["method.eta=0.3", f"method.adjustment={adjustment}"], train, Slice(0, 10))
    counts = torch.bincount(group_ids(train.labels, train.digits), minlength=100).float()
    assert (counts > 0).all()  # every group present, as the reference assumes
    ref = ReferenceLossComputer(100, counts, adjustment, 0.3)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, len(train), (64,), generator=g)
        logits = torch.randn(64, 10, generator=g)
        y, d = train.labels[idx], train.digits[idx]
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss, _ = ours.loss(Batch(a, y, d, group_ids(y, d), idx))
        ref_loss = ref.loss(b, y, group_ids(y, d))
        loss.backward()
        ref_loss.backward()
        assert torch.allclose(loss, ref_loss, atol=1e-6) and torch.allclose(ours.q, ref.adv_probs, atol=1e-6)
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_groupdro_draws_group_balanced_batches_by_default():
    """group_DRO data/dro_dataset.py get_loader(reweight_groups=True): weights len / group_counts[g]."""
    train = _split(3000)
    ours = _method("groupdro", [], train, Slice(0, 10))
    torch.manual_seed(0)
    order = torch.cat([ours.epoch_order() for _ in range(20)])
    per_group = torch.bincount(group_ids(train.labels[order], train.digits[order]), minlength=100).float()
    assert len(order) == 20 * len(train)
    assert float(per_group.std() / per_group.mean()) < 0.1  # about equal, whatever the groups' sizes
    assert _method("groupdro", ["method.sampling=natural"], train, Slice(0, 10)).epoch_order() is None


# ---- LfF: alinlab/LfF train.py, util.py, module/loss.py -------------------------------------------

class ReferenceEMA:
    """alinlab/LfF `util.py` `EMA`."""

    def __init__(self, label, alpha=0.9):
        self.label, self.alpha = label, alpha
        self.parameter = torch.zeros(label.size(0))
        self.updated = torch.zeros(label.size(0))

    def update(self, data, index):
        self.parameter[index] = self.alpha * self.parameter[index] + (1 - self.alpha * self.updated[index]) * data
        self.updated[index] = 1

    def max_loss(self, label):
        label_index = np.where(self.label == label)[0]
        return self.parameter[label_index].max()


def reference_gce(logits, targets, q):
    """alinlab/LfF `module/loss.py` `GeneralizedCELoss.forward`."""
    p = nn.functional.softmax(logits, dim=1)
    yg = torch.gather(p, 1, torch.unsqueeze(targets, 1))
    loss_weight = (yg.squeeze().detach() ** q) * q
    return nn.functional.cross_entropy(logits, targets, reduction="none") * loss_weight


def test_lff_loss_and_moving_averages_match_alinlab_train_py():
    train = _split(300)
    q, alpha = 0.7, 0.7
    ours = _method("lff", [f"method.q={q}", f"method.ema={alpha}"], train, Slice(10, 20),
                   new_model=lambda: Slice(0, 10))
    ema_b, ema_d = ReferenceEMA(train.labels, alpha), ReferenceEMA(train.labels, alpha)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(len(train), generator=g)
    for step in range(6):  # two passes over the data: first visits, then moving averages
        index = perm[(step % 3) * 100:(step % 3 + 1) * 100]
        label = train.labels[index]
        logit_b, logit_d = torch.randn(100, 10, generator=g), torch.randn(100, 10, generator=g)
        # train.py, the loop body
        loss_b = nn.functional.cross_entropy(logit_b, label, reduction="none").detach()
        loss_d = nn.functional.cross_entropy(logit_d, label, reduction="none").detach()
        ema_b.update(loss_b, index)
        ema_d.update(loss_d, index)
        loss_b = ema_b.parameter[index].clone().detach()
        loss_d = ema_d.parameter[index].clone().detach()
        for c in range(10):
            class_index = np.where(label == c)[0]
            loss_b[class_index] /= ema_b.max_loss(c)
            loss_d[class_index] /= ema_d.max_loss(c)
        loss_weight = loss_b / (loss_b + loss_d + 1e-8)
        ref = reference_gce(logit_b, label, q).mean() + (
            nn.functional.cross_entropy(logit_d, label, reduction="none") * loss_weight).mean()
        mine, _ = ours.loss(Batch(torch.cat([logit_b, logit_d], 1), label, train.digits[index], label, index))
        assert torch.allclose(mine, ref, atol=1e-6), step
        assert torch.allclose(ours.loss_ema[0], ema_b.parameter, atol=1e-6)
        assert torch.allclose(ours.loss_ema[1], ema_d.parameter, atol=1e-6)


def test_lff_biased_model_is_initialised_like_the_main_one(dataset):
    from shortcut_study.runtime import resolve_runtime
    from shortcut_study.train import build_trainer, load_data

    cfg = make_config(sets=["train.method=lff", "train.init=whiten"])
    rt = resolve_runtime("cpu")
    train, _ = load_data(cfg, dataset, rt)
    trainer = build_trainer(cfg, train, rt, dataset)
    assert torch.equal(trainer.model.conv1.weight, trainer.method.biased.conv1.weight)  # both whitened


# ---- JTT: anniesch/jtt run_expt.py, process_training.py -----------------------------------------

def test_jtt_epoch_is_the_training_set_plus_copies_of_the_error_set():
    """run_expt.py: upsampled_points = Subset(train_data, list(aug_indices) * up_weight_factor);
    train_data = ConcatDataset([train_data, upsampled_points]). Our lambda is the paper's weight of
    an error-set image: up_weight_factor = lambda - 1 extra copies."""
    train = _split(50)
    seen = {}

    def train_erm(epochs, cfg):
        seen.update(epochs=epochs, shuffle=cfg.augment.digit_shuffle_p, schedule_epochs=cfg.train.epochs)
        return Slice(0, 10)

    errors_at = torch.tensor([3, 7, 7 + 1, 20, 49])
    logits = torch.nn.functional.one_hot(train.labels, 10).float() * 5
    logits[errors_at] = torch.nn.functional.one_hot((train.labels[errors_at] + 1) % 10, 10).float() * 5
    ours = _method("jtt", ["method.identify_epochs=2", "method.upweight=4", "train.epochs=6",
                           "augment.digit_shuffle_p=1", "method.epoch=concatenated"], train, Slice(0, 10),
                   train_erm=train_erm, predict=lambda model, images: logits)
    ours.prepare()
    # process_training.py: wrong_1_times = (y_pred != y_true) of the ERM run's epoch-T outputs
    assert seen == {"epochs": 2, "shuffle": 0.0, "schedule_epochs": 6}  # the recipe's schedule, no digit shuffle
    assert torch.equal(torch.nonzero(ours.errors).flatten(), errors_at)
    up_weight_factor = 4 - 1
    reference = list(range(len(train))) + errors_at.tolist() * up_weight_factor
    order = ours.epoch_order()
    assert sorted(order.tolist()) == sorted(reference) and ours.epoch_length() == len(reference)
    assert not torch.equal(order, torch.tensor(reference))  # shuffled, as the DataLoader's shuffle=True

    # The default (every method's step budget, SubpopBench's protocol): N images a epoch, drawn
    # without replacement from that concatenation.
    ours.hp["epoch"] = "fixed"
    fixed = torch.cat([ours.epoch_order() for _ in range(200)])
    assert ours.epoch_length() == len(train) and len(fixed) == 200 * len(train)
    assert set(fixed.tolist()) <= set(reference)
    share = torch.isin(fixed, errors_at).float().mean().item()
    expected = 4 * len(errors_at) / len(reference)  # an error-set image is 4 of the concatenation's entries
    assert abs(share - expected) < 0.02


# ---- DFR: PolinaKirichenko/deep_feature_reweighting dfr_evaluate_spurious.py ---------------------

def test_dfr_averaged_coefficients_match_dfr_on_validation_eval(monkeypatch):
    """dfr_on_validation_eval: for each retrain, subsample every group to min_g, fit
    LogisticRegression(penalty="l1", C=c, solver="liblinear") (one-vs-rest for several classes), and
    average coef_ / intercept_."""
    from sklearn.linear_model import LogisticRegression

    from shortcut_study.methods import dfr

    rng = np.random.default_rng(0)
    n, classes = 600, 4
    y = rng.integers(0, classes, n)
    groups = y * 3 + rng.integers(0, 3, n)
    x = rng.normal(size=(n, 6)) + y[:, None] * 0.7
    subsamples = []
    real = dfr.balanced_subsample

    def recorded(g, r):
        rows = real(g, r)
        subsamples.append(rows)
        return rows

    monkeypatch.setattr(dfr, "balanced_subsample", recorded)
    coef, intercept = dfr.averaged_refit(x, y, groups, c=0.3, retrains=3, seed=0, num_classes=classes)
    assert len(subsamples) == 3
    min_g = np.bincount(groups).min()
    coefs, intercepts = [], []
    for rows in subsamples:
        assert (np.bincount(groups[rows]) == min_g).all()  # every group cut to the smallest, as g[:min_g]
        # the reference's multi-class liblinear fit is one binary L1 fit per class (one-vs-rest)
        per_class = [LogisticRegression(C=0.3, l1_ratio=1.0, solver="liblinear", random_state=0)
                     .fit(x[rows], (y[rows] == k).astype(int)) for k in range(classes)]
        coefs.append(np.vstack([m.coef_ for m in per_class]))
        intercepts.append(np.concatenate([m.intercept_ for m in per_class]))
    assert np.allclose(coef, np.mean(coefs, axis=0), atol=1e-6)
    assert np.allclose(intercept, np.mean(intercepts, axis=0), atol=1e-6)


def test_dfr_tunes_c_on_the_reference_grid():
    from shortcut_study.methods.dfr import C_OPTIONS

    assert C_OPTIONS == (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # dfr_evaluate_spurious.py, WaterBirds
