"""The required CNN and checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shortcut_study.errors import UserError
from shortcut_study.model import CNN, count_parameters, load_model, plain_state_dict


def test_parameter_count_and_shapes():
    model = CNN()
    assert count_parameters(model) == 95_882
    logits, feats = model(torch.randn(4, 3, 40, 40), intermediate_outputs=True)
    assert logits.shape == (4, 10)
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 40, 40), (32, 40, 40), (48, 20, 20), (64, 10, 10), (80, 5, 5)]
    assert model(torch.randn(4, 3, 40, 40)).shape == (4, 10)


def test_intermediate_outputs_are_raw_convolutions():
    model = CNN().eval()
    x = torch.randn(2, 3, 40, 40)
    _, feats = model(x, intermediate_outputs=True)
    assert torch.allclose(feats[0], model.conv1(x))
    assert (feats[0] < 0).any()  # before BN and ReLU


def test_batch_of_one():
    model = CNN().eval()
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 10)


def test_load_model_round_trip_and_errors(tmp_path):
    model = CNN()
    path = tmp_path / "q1_model.pt"
    torch.save(plain_state_dict(model), path)
    loaded = load_model(path)
    x = torch.randn(2, 3, 40, 40)
    assert torch.allclose(loaded(x), model.eval()(x))

    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 4).state_dict(), other)
    with pytest.raises(UserError, match="does not fit the required CNN"):
        load_model(other)
    listy = tmp_path / "list.pt"
    torch.save([1, 2, 3], listy)
    with pytest.raises(UserError, match="not a state_dict"):
        load_model(listy)


def test_the_folded_predictor_gives_the_models_logits():
    from shortcut_study.model import folded_for_inference

    torch.manual_seed(0)
    model = CNN()
    model.train()
    with torch.no_grad():
        for _ in range(3):  # batch-norm statistics that are not the identity
            model(torch.randn(64, 3, 40, 40) * 2 + 0.5)
    model.eval()
    x = torch.randn(16, 3, 40, 40)
    folded = folded_for_inference(model, torch.float32)
    assert torch.allclose(folded(x), model(x), atol=1e-4)
    assert model.bn1.training is False and isinstance(model.bn1, torch.nn.BatchNorm2d)  # the model is untouched
    bf16 = folded_for_inference(model, torch.bfloat16)
    assert bf16.conv1.weight.dtype == torch.bfloat16
    assert (bf16(x.bfloat16()).float().argmax(1) == model(x).argmax(1)).float().mean() >= 0.9
