"""data.py — the datasets and loaders of CSE 849 Project 2 (handout section 1.1).

Training images: random horizontal flip, to-tensor, the handout's channel-wise normalisation; val
and test images: to-tensor and normalisation only (no random transform outside training).
`ImageFolder` reads train/ and val/ (one folder per class); the unlabeled test folder has no class
folders, so `TestImages` reads it, its images in file-name order. Needs torch and torchvision only.
"""

from pathlib import Path

import torch
from PIL import Image
from torchvision import datasets, transforms

MEAN = None  # filled in by shortcut-study submission
STD = None  # filled in by shortcut-study submission

train_transform = transforms.Compose([
    transforms.RandomHorizontalFlip(),  # (1) random horizontal flip, training only
    transforms.ToTensor(),  # (2) PIL image -> tensor in [0, 1]
    transforms.Normalize(MEAN, STD),  # (3) channel-wise normalisation
])
eval_transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class TestImages(torch.utils.data.Dataset):
    """The unlabeled test folder: (image, file name) pairs, names sorted as strings."""

    def __init__(self, root, transform=eval_transform):
        self.files = sorted(p.name for p in Path(root).iterdir() if p.suffix.lower() == ".png")
        self.root, self.transform = Path(root), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.root / self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.files[i]


def test_folder(root):
    """`test_unlabeled/` (the handout's `test/` also works)."""
    for name in ("test_unlabeled", "test"):
        if (Path(root) / name).is_dir():
            return Path(root) / name
    raise SystemExit(f"no test_unlabeled/ or test/ folder in {root}")


def get_loaders(root, batch_size=128, num_workers=2):
    """Train, val and test loaders over the course's folder (train/, val/, test_unlabeled/)."""
    root = Path(root)
    train = datasets.ImageFolder(root / "train", transform=train_transform)
    val = datasets.ImageFolder(root / "val", transform=eval_transform)
    test = TestImages(test_folder(root))
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                                        num_workers=num_workers),
            torch.utils.data.DataLoader(val, batch_size=256, num_workers=num_workers),
            torch.utils.data.DataLoader(test, batch_size=256, num_workers=num_workers))
