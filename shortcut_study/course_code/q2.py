"""q2.py — draw all 16 filters of the first convolutional layer (handout section 2.1).

    python q2.py [--checkpoint q1_model.pt] [--out conv1_filters.png]

conv1's weight has shape out channels x in channels x k x k = 16 x 3 x 7 x 7: each filter is a
7 x 7 RGB image, shown with `imshow` after scaling it to [0, 1]. Needs torch and matplotlib.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from model import CNN  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description="draw the 16 conv1 filters")
    ap.add_argument("--checkpoint", default="q1_model.pt")
    ap.add_argument("--out", default="conv1_filters.png")
    args = ap.parse_args()
    model = CNN()
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    weights = model.conv1.weight.detach()  # (16, 3, 7, 7)
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
    for i, ax in enumerate(axes.flat):
        w = weights[i]
        w = (w - w.min()) / (w.max() - w.min() + 1e-12)  # each filter scaled to [0, 1] to be seen as RGB
        ax.imshow(w.permute(1, 2, 0).numpy())
        ax.set_title(f"filter {i}", fontsize=8)
        ax.axis("off")
    fig.suptitle("conv1 filters (RGB)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
