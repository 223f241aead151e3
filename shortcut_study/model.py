"""The course's required 5-layer CNN (95,882 parameters)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .config import NUM_CLASSES
from .errors import UserError, require_file


class CNN(nn.Module):
    """conv1 k7 -> conv2..conv5 k3 (stride 1), BN+ReLU after conv1-4, 2x2 max-pool after conv2-4,
    conv5 raw -> global average pool -> Linear(80, 10). Feature maps 40 -> 20 -> 10 -> 5."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=7, padding=3)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 48, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(48)
        self.conv4 = nn.Conv2d(48, 64, kernel_size=3, padding=1)
        self.bn4 = nn.BatchNorm2d(64)
        self.conv5 = nn.Conv2d(64, 80, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(80, num_classes)

    def forward(self, x: torch.Tensor, intermediate_outputs: bool = False):
        # In-place ReLU acts on the BN outputs, never on the raw conv outputs we return.
        act = self.relu
        c1 = self.conv1(x)
        h = act(self.bn1(c1))
        c2 = self.conv2(h)
        h = self.pool(act(self.bn2(c2)))
        c3 = self.conv3(h)
        h = self.pool(act(self.bn3(c3)))
        c4 = self.conv4(h)
        h = self.pool(act(self.bn4(c4)))
        c5 = self.conv5(h)
        logits = self.fc(torch.flatten(self.avgpool(c5), 1))
        if intermediate_outputs:
            return logits, [c1, c2, c3, c4, c5]
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def folded_for_inference(model: CNN, dtype: torch.dtype) -> CNN:
    """A copy for prediction only: each batch norm folded into the convolution before it (eval-mode
    statistics) and the weights cast to `dtype`. Its logits are the model's; its intermediate
    outputs are not the raw convolutions, so activation studies use the model itself. On a CPU with
    bf16, predicting in bf16 weights runs ~1.4x the images/s of autocast (measured in evidence.md)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for i in range(1, 5):
        setattr(folded, f"conv{i}", fuse_conv_bn_eval(getattr(folded, f"conv{i}"), getattr(folded, f"bn{i}")))
        setattr(folded, f"bn{i}", nn.Identity())
    return folded.to(dtype)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU, contiguous-format copy of the weights, loadable anywhere with weights_only=True."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
            for k, v in model.state_dict().items()}


def load_model(path: str | Path, device: torch.device | str = "cpu") -> CNN:
    """Load a plain state_dict checkpoint (e.g. q1_model.pt) into the required CNN."""
    path = require_file(path, "checkpoint", "train a model first or pass --checkpoint PATH")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}): "
                        "give a state_dict saved by shortcut-study (q1_model.pt)") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a last-state training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} is not a state_dict of tensors: give q1_model.pt")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds NaN or infinite weights ({bad}): the training that wrote it "
                        "diverged — retrain with a lower train.lr")
    model = CNN()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "mismatch"
        raise UserError(f"checkpoint {path} does not fit the required CNN ({first}): "
                        "it was saved from another architecture") from None
    return model.to(device).eval()
