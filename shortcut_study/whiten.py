"""Whitened first-layer initialisation (as in hlb-CIFAR10 / airbench): conv1's filters start as the
leading principal directions of the training images' patches, each scaled to unit variance and
used with both signs, so the first steps see decorrelated edge and colour features instead of
noise. The filters stay trainable (the required CNN's conv1 is an ordinary layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize
from .config import GeometryConfig


def patch_covariance(images_u8: torch.Tensor, kernel: int, n_images: int = 1000, chunk: int = 250,
                     geom: GeometryConfig | None = None) -> torch.Tensor:
    """The (uncentred) covariance of every `kernel` x `kernel` patch of `n_images` normalised images
    spread evenly over the split (files are class-sorted, so a prefix would hold few classes)."""
    pick = torch.linspace(0, len(images_u8) - 1, min(n_images, len(images_u8)), device=images_u8.device).long()
    dim = images_u8.shape[1] * kernel * kernel
    cov = torch.zeros(dim, dim, dtype=torch.float64, device=images_u8.device)
    count = 0
    for start in range(0, len(pick), chunk):
        x = normalize(images_u8[pick[start:start + chunk]], geom)
        cols = F.unfold(x, kernel).transpose(1, 2).reshape(-1, dim)  # (patches, dim)
        cov += (cols.T @ cols).double()
        count += cols.shape[0]
    return (cov / max(1, count)).float()


@torch.no_grad()
def whiten_conv(conv: nn.Conv2d, images_u8: torch.Tensor, eps: float = 5e-4, geom: GeometryConfig | None = None) -> None:
    """Set `conv`'s weights to the top out_channels/2 whitening filters of its input patches and
    their negatives, and its bias to 0 (a batch norm follows)."""
    out_ch, in_ch, kh, kw = conv.weight.shape
    if kh != kw or out_ch < 2:
        raise ValueError(f"whitening needs a square kernel and >= 2 filters, got {tuple(conv.weight.shape)}")
    eigenvalues, eigenvectors = torch.linalg.eigh(patch_covariance(images_u8, kh, geom=geom))
    top = torch.arange(len(eigenvalues) - 1, len(eigenvalues) - 1 - out_ch // 2, -1)
    filters = (eigenvectors[:, top] / torch.sqrt(eigenvalues[top] + eps)).T.reshape(-1, in_ch, kh, kw)
    signed = torch.cat([filters, -filters])
    if len(signed) < out_ch:  # an odd count: the last filter repeats the leading direction
        signed = torch.cat([signed, filters[:1]])
    conv.weight.copy_(signed.to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()
