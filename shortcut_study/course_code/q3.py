"""q3.py — class-wise activation norms of the first and the fifth convolutional layers (handout
section 2.2, steps 1-6).

    python q3.py --data custom_image_dataset [--checkpoint q1_model.pt] [--out norms]

1. iterate over the validation loader; 2. get the intermediate outputs (intermediate_outputs=True);
3. the channel-wise L2 norm of the conv1 and conv5 outputs over height and width (b x c);
4. keep the per-class sums for every filter (10 x c); 5. one bar plot per filter of the class-wise
average norm: 16 + 80 = 96 plots in --out; 6. the printed coefficient of variation across classes
says which filters respond alike to every class. Needs torch, torchvision and matplotlib.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from data import get_loaders  # noqa: E402
from model import CNN  # noqa: E402

LAYERS = {"conv1": 0, "conv5": 4}  # positions in the intermediate outputs
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def main():
    ap = argparse.ArgumentParser(description="bar plots of the class-wise activation norms of conv1 and conv5")
    ap.add_argument("--data", default="custom_image_dataset")
    ap.add_argument("--checkpoint", default="q1_model.pt")
    ap.add_argument("--out", default="norms")
    args = ap.parse_args()
    model = CNN()
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    _, val_loader, _ = get_loaders(args.data)
    sums = {name: None for name in LAYERS}
    counts = torch.zeros(10)
    with torch.no_grad():
        for x, y in val_loader:  # step 1
            _, feats = model(x, intermediate_outputs=True)  # step 2
            onehot = torch.nn.functional.one_hot(y, 10).double()
            counts += onehot.sum(0)
            for name, i in LAYERS.items():
                norms = feats[i].flatten(2).norm(dim=2).double()  # step 3: (b, c)
                s = onehot.T @ norms  # step 4: (10, c)
                sums[name] = s if sums[name] is None else sums[name] + s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, s in sums.items():
        mean = s / counts.clamp(min=1)[:, None]  # class-wise average norm, (10, c)
        for f in range(mean.shape[1]):  # step 5
            fig, ax = plt.subplots(figsize=(5, 2.6))
            ax.bar(range(10), mean[:, f].numpy())
            ax.set_xticks(range(10), CLASSES, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel("mean L2 norm")
            ax.set_title(f"{name} filter {f}")
            fig.tight_layout()
            fig.savefig(out / f"{name}_filter{f:02d}.png", dpi=100)
            plt.close(fig)
        cv = (mean.std(0) / mean.mean(0).clamp(min=1e-12)).median()  # step 6
        print(f"{name}: {mean.shape[1]} bar plots; median coefficient of variation across classes {cv:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
