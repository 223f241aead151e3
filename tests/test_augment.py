"""Batched augmentations: each touches only what it should."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from shortcut_study.augment import AUGMENTATIONS, augment_batch, digit_shuffle, normalize, shift_patch
from shortcut_study.config import NORM_MEAN, NORM_STD, AugmentConfig, GeometryConfig

G = GeometryConfig()
OFF = AugmentConfig(flip="none", translate=0, noise_sigma=0, erase_p=0, digit_shuffle_p=0)


def _batch(n: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8)


def _cifar_mask() -> torch.Tensor:
    m = torch.zeros(40, 40, dtype=torch.bool)
    m[0:24, 0:24] = True
    return m


def _digit_mask() -> torch.Tensor:
    m = torch.zeros(40, 40, dtype=torch.bool)
    m[24:40, 24:40] = True
    return m


def test_normalize_matches_torchvision():
    x = _batch(8)
    ref = v2.Normalize(NORM_MEAN, NORM_STD)(x.float() / 255)
    assert torch.allclose(normalize(x), ref, atol=1e-5)


def test_all_off_is_plain_normalisation():
    x = _batch()
    digits = torch.randint(0, 10, (len(x),))
    y, shown = augment_batch(x, digits, OFF, G)
    assert torch.equal(y, normalize(x)) and torch.equal(shown, digits)


def test_digit_shuffle_moves_only_digits_and_carries_them():
    x = normalize(_batch())
    digits = torch.arange(len(x)) % 10
    cfg = AugmentConfig(digit_shuffle_p=1.0)
    y, shown = digit_shuffle(x, digits, cfg, G)
    assert torch.equal(y[..., ~_digit_mask()], x[..., ~_digit_mask()])
    assert not torch.equal(y[..., _digit_mask()], x[..., _digit_mask()])
    # every new digit patch is some image's digit patch, and the digit the batch carries is that image's
    patches = x[:, :, 24:40, 24:40].reshape(len(x), -1)
    for row, digit in zip(y[:, :, 24:40, 24:40].reshape(len(x), -1), shown):
        donors = torch.nonzero((patches == row).all(1)).flatten()
        assert len(donors) == 1 and digits[donors[0]] == digit
    assert not torch.equal(shown, digits)  # the carried digits moved with the patches


def test_patch_flip_and_translate_stay_in_the_cifar_patch():
    x = normalize(_batch())
    for name, cfg in (("flip", AugmentConfig(flip="patch", flip_p=1.0)), ("translate", AugmentConfig(translate=3))):
        y = AUGMENTATIONS[name](x, cfg, G)
        assert torch.equal(y[..., ~_cifar_mask()], x[..., ~_cifar_mask()]), name
        assert not torch.equal(y, x), name
    y = AUGMENTATIONS["flip"](x, AugmentConfig(flip="patch", flip_p=1.0), G)
    assert torch.equal(y[:, :, 0:24, 0:24], x[:, :, 0:24, 0:24].flip(-1))


def test_translate_shifts_content():
    x = normalize(_batch(256))
    y = AUGMENTATIONS["translate"](x, AugmentConfig(translate=2), G)
    # the interior of a shifted patch equals the original shifted by at most 2 px
    for i in range(8):
        found = any(torch.equal(y[i, :, 2:22, 2:22], x[i, :, 2 + dy:22 + dy, 2 + dx:22 + dx])
                    for dy in range(-2, 3) for dx in range(-2, 3))
        assert found


def test_shift_patch_is_a_fixed_translate():
    x = normalize(_batch(4))
    down_right = shift_patch(x, G, 1, 2)
    assert torch.equal(down_right[:, :, 1:24, 2:24], x[:, :, 0:23, 0:22])  # content moved down 1, right 2
    assert torch.equal(down_right[..., ~_cifar_mask()], x[..., ~_cifar_mask()])
    assert torch.equal(shift_patch(x, G, 0, 0), x)


def test_tta_views_leave_the_digit_in_place():
    from shortcut_study.registry import TTA

    x = normalize(_batch(4))
    assert [len(v) for v in TTA.values()] == [1, 2, 18]
    for name, views in TTA.items():
        for view in views:
            assert torch.equal(view(x, G)[..., _digit_mask()], x[..., _digit_mask()]), name


def test_image_flip_mirrors_whole_canvas():
    x = normalize(_batch())
    y = AUGMENTATIONS["flip"](x, AugmentConfig(flip="image", flip_p=1.0), G)
    assert torch.equal(y, x.flip(-1))


def test_erase_and_noise():
    x = normalize(_batch(128))
    y = AUGMENTATIONS["erase"](x, AugmentConfig(erase_p=1.0, erase_scale_min=0.1, erase_scale_max=0.1), G)
    zeroed = (y == 0).all(1).float().mean((1, 2))
    assert ((zeroed > 0.05) & (zeroed < 0.2)).all()
    y = AUGMENTATIONS["noise"](x, AugmentConfig(noise_sigma=0.5), G)
    assert abs(float((y - x).std()) - 0.5) < 0.02
