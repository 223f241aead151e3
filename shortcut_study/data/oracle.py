"""The digit oracle: a small CNN that reads the MNIST digit patch of a composite.

The course's own data carries no digit labels; `annotate` recovers them so aligned / conflicting
metrics work there too. The oracle is trained on MNIST digits rendered exactly as in the
composites (same resize, same patch) and ships with the package (`assets/digit_oracle.pt`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeometryConfig
from ..errors import UserError, atomic_path, require_file, require_writable
from .composite import METADATA_COLUMNS, compose
from .layout import METADATA, SPLITS, load_split
from .sources import MNIST, load_source

SHIPPED_ORACLE = Path(__file__).resolve().parents[1] / "assets" / "digit_oracle.pt"


class DigitOracle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Any patch size works: pool the features to the 4x4 the head expects.
        return self.head(F.adaptive_avg_pool2d(self.features(x), 4))


def digit_patches(images_u8: torch.Tensor, geom: GeometryConfig) -> torch.Tensor:
    """The digit patch of each composite as a float (N, 1, s, s) in [0, 1] (channels averaged)."""
    ys, xs = geom.digit_box
    return images_u8[:, :, ys, xs].float().mean(1, keepdim=True) / 255.0


def render_mnist(images: np.ndarray, geom: GeometryConfig) -> torch.Tensor:
    """MNIST digits rendered as they appear in composites, as oracle inputs."""
    blank = np.zeros((len(images), 32, 32, 3), dtype=np.uint8)
    return digit_patches(torch.from_numpy(compose(blank, images, geom)), geom)


@torch.no_grad()
def oracle_predict(model: DigitOracle, patches: torch.Tensor, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs = torch.cat([F.softmax(model(patches[i:i + batch]), 1) for i in range(0, len(patches), batch)])
    conf, pred = probs.max(1)
    return pred.numpy(), conf.numpy()


def train_oracle(mnist_src: str | Path, out: str | Path, epochs: int = 3, seed: int = 0,
                 geom: GeometryConfig | None = None) -> str:
    """Train the oracle on MNIST train (with ±1 px jitter), report MNIST-test accuracy, save weights."""
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1 (got {epochs}): an untrained oracle reads digits at chance")
    require_writable(out)
    geom = geom or GeometryConfig()
    torch.manual_seed(seed)
    mnist = load_source(mnist_src, MNIST)
    x_train = render_mnist(mnist["train"].images, geom)
    y_train = torch.from_numpy(mnist["train"].labels)
    x_test = render_mnist(mnist["test"].images, geom)
    model = DigitOracle()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x_train) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(2, steps))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(len(x_train) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            dy, dx = torch.randint(-1, 2, (2,)).tolist()  # small jitter: robust to resize offsets
            xb = torch.roll(x_train[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    pred, _ = oracle_predict(model, x_test)
    acc = float((pred == mnist["test"].labels).mean() * 100)
    with atomic_path(out) as tmp:
        torch.save(model.state_dict(), tmp)
    return f"digit oracle: {acc:.2f} % on {len(pred)} MNIST test digits; saved {out}"


def load_oracle(path: str | Path | None = None) -> DigitOracle:
    path = require_file(path or SHIPPED_ORACLE, "digit oracle weights",
                        "train one with `shortcut-study data oracle --mnist SRC --out PATH`")
    model = DigitOracle()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise UserError(f"digit oracle {path} is unreadable ({type(exc).__name__}): retrain it") from None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"digit oracle {path} holds NaN or infinite weights ({bad[0]}): it would read every digit "
                        "wrong — retrain it with `shortcut-study data oracle`")
    return model.eval()


def annotate(data_dir: str | Path, oracle: str | Path | None = None, mnist: str | Path | None = None,
             geom: GeometryConfig | None = None, force: bool = False) -> str:
    """Label the digit of every image of a course-layout folder; write its metadata.csv."""
    geom = geom or GeometryConfig()
    root = Path(data_dir)
    if (root / METADATA).is_file() and not force:
        raise UserError(f"{root / METADATA} exists already — it holds digit labels; pass --force to replace them")
    if oracle is None and not SHIPPED_ORACLE.is_file():
        if mnist is None:
            raise UserError("no digit oracle shipped: pass --mnist SRC to train one, or --oracle PATH")
        oracle = root / "cache" / "digit_oracle.pt"
        train_oracle(mnist, oracle, geom=geom)
    model = load_oracle(oracle)
    frames, lines = [], ["split   images  agreement  low-confidence (<0.9)"]
    for split in SPLITS:
        try:
            data = load_split(root, split, geom.canvas)
        except UserError:
            if split == "train":
                raise
            continue  # val or test may be absent
        digits, conf = oracle_predict(model, digit_patches(data.images, geom))
        labels = data.labels.numpy()
        frames.append(pd.DataFrame({"split": split, "file": data.files, "label": labels, "digit": digits,
                                    "aligned": ((labels == digits) & (labels >= 0)).astype(int),
                                    "cifar_index": -1, "mnist_index": -1}))
        agree = f"{np.mean(labels == digits):>8.1%}" if (labels >= 0).all() else "       –"
        lines.append(f"{split:<6} {len(digits):>7}  {agree}  {int((conf < 0.9).sum()):>8}")
    meta = pd.concat(frames, ignore_index=True)[METADATA_COLUMNS]
    with atomic_path(root / METADATA) as tmp:
        meta.to_csv(tmp, index=False, lineterminator="\n")
    return "\n".join(lines + [f"wrote {root / METADATA}"])
