"""Tests for datkit.models: every registered model builds, runs forward/backward, and is deterministic in eval."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from datkit.models import MODELS, Normalize, NormalizedModel, create_model, list_models

# (in_channels, image_size, batch) per model; models not listed get the CIFAR-like default.
_INPUT = {
    "cnn_small": (1, 28, 4),
    "cnn_4layer": (1, 28, 4),
    "cnn_madry": (1, 28, 4),
    "cnn_7layer_bn": (1, 28, 4),
    "resnet50": (3, 64, 2),
}
_DEFAULT_INPUT = (3, 32, 2)


def _build(name: str, **kwargs) -> tuple[NormalizedModel, torch.Tensor]:
    c, s, b = _INPUT.get(name, _DEFAULT_INPUT)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=c, image_size=s, **kwargs)
    return model, torch.rand(b, c, s, s)


def test_builtin_models_registered() -> None:
    assert {"cnn_small", "cnn_7layer_bn", "preact_resnet18", "wide_resnet", "resnet50"} <= set(list_models())
    assert list_models() == MODELS.names()


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    model, x = _build(name)
    assert isinstance(model, NormalizedModel)
    assert isinstance(model.normalize, Normalize) and isinstance(model.net, nn.Module)
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], 10)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no grad for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite grad for {pname}"


@pytest.mark.parametrize("name", list_models())
def test_eval_deterministic(name: str) -> None:
    model, x = _build(name)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (x.shape[0], 10)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", list_models())
def test_unknown_kwarg_raises(name: str) -> None:
    with pytest.raises((TypeError, ValueError)) as exc:
        _build(name, not_a_real_kwarg=1)
    assert name in str(exc.value) and "not_a_real_kwarg" in str(exc.value)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(KeyError) as exc:
        create_model("no_such_model", num_classes=10)
    msg = str(exc.value)
    assert "no_such_model" in msg
    for known in list_models():
        assert known in msg


def test_normalize_applies_mean_std() -> None:
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0), in_channels=3)
    assert norm.mean.shape == (1, 3, 1, 1) and norm.std.shape == (1, 3, 1, 1)
    assert "mean" in dict(norm.named_buffers()) and "std" in dict(norm.named_buffers())
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25, x[:, 2] / 2.0], dim=1)
    torch.testing.assert_close(norm(x), expected)


def test_normalize_broadcasts_length_one() -> None:
    norm = Normalize((0.5,), (0.25,), in_channels=3)
    assert norm.mean.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), (x - 0.5) / 0.25)
    # Without in_channels a length-1 mean/std broadcasts over any channel count.
    torch.testing.assert_close(Normalize((0.5,), (0.25,))(x), (x - 0.5) / 0.25)


def test_normalize_bad_length_raises() -> None:
    with pytest.raises(ValueError):
        Normalize((0.1, 0.2), (1.0,), in_channels=3)
    with pytest.raises(ValueError):
        Normalize((0.1, 0.2, 0.3), (1.0, 2.0), in_channels=3)
    with pytest.raises(ValueError):
        create_model("cnn_small", num_classes=10, in_channels=1, mean=(0.1, 0.2, 0.3), std=(1.0,))
    with pytest.raises(ValueError):
        Normalize((0.0,), (0.0,))


def test_create_model_puts_normalization_inside() -> None:
    torch.manual_seed(0)
    model = create_model("cnn_small", num_classes=10, mean=(0.1307,), std=(0.3081,))
    model.eval()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), model.net((x - 0.1307) / 0.3081))


def test_wide_resnet_bad_depth_raises() -> None:
    with pytest.raises(ValueError, match="depth"):
        create_model("wide_resnet", num_classes=10, in_channels=3, image_size=32, depth=27)


def test_wide_resnet_kwargs() -> None:
    model = create_model("wide_resnet", num_classes=10, in_channels=3, image_size=32,
                         depth=10, widen_factor=2, dropout=0.3)
    assert model.net.fc.in_features == 128
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_small_has_no_batchnorm() -> None:
    model = create_model("cnn_small", num_classes=10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cnn_small_kwargs_and_image_size() -> None:
    model = create_model("cnn_small", num_classes=10, in_channels=3, image_size=32,
                         mean=(0.5,), std=(0.5,), channels=(8, 16), hidden=32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        create_model("cnn_small", num_classes=10, image_size=30)


def test_cnn_7layer_bn_is_flat_sequential() -> None:
    model = create_model("cnn_7layer_bn", num_classes=10, in_channels=3, image_size=32, width=16, linear_size=64)
    assert isinstance(model.net, nn.Sequential)
    assert not any(isinstance(m, nn.Sequential) for m in model.net)
    convs = [m for m in model.net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 32]
    assert [c.stride for c in convs] == [(1, 1), (1, 1), (2, 2), (1, 1), (1, 1)]
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 32 * 16 * 16 and linears[0].out_features == 64
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_in_channels() -> None:
    model = create_model("resnet50", num_classes=7, in_channels=1, image_size=64)
    assert model.net.conv1.in_channels == 1
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 7)
