"""Tests for datkit.models.external: torchvision's (and timm's) classification models as datkit models.

No weights are ever downloaded: models are built with ``weights=None`` / ``pretrained=False`` (the one test that
passes ``weights`` replaces torchvision's download by a local state dict).
"""
from __future__ import annotations

import inspect
import sys

import pytest
import torch
from torch import nn

from datkit.models import MODELS, NormalizedModel, create_model
from datkit.models.external import EXTERNAL_PREFIXES, external_factory, timm_model, torchvision_model
from datkit.registry import PluginError
from helpers.runs import one_thread

# Small, fast on CPU, and different stems: ResNet (conv1 + maxpool, adapted to small images), MobileNet-v3 and
# EfficientNet (Conv2dNormActivation in `features`), SqueezeNet (a plain Conv2d first), GoogLeNet (aux heads).
_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1", "googlenet"]
_SHAPES = [(1, 28), (3, 32)]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # small models on a shared 2-core machine: threads only contend
        yield


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("in_channels,image_size", _SHAPES, ids=[f"{c}x{s}" for c, s in _SHAPES])
@pytest.mark.parametrize("name", _MODELS)
def test_torchvision_model_trains(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = external_factory("torchvision", name)(num_classes=7, in_channels=in_channels, image_size=image_size)
    assert isinstance(model, nn.Module)
    assert all(m.training for m in model.modules())  # the build-time check restored train mode
    assert _first_conv(model).in_channels == in_channels
    x = torch.rand(2, in_channels, image_size, image_size)
    out = model(x)  # train mode, batch 2
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    grad = _first_conv(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_create_model_with_prefix() -> None:
    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v3_small", num_classes=10, in_channels=1, image_size=28,
                         mean=(0.5,), std=(0.25,))
    assert isinstance(model, NormalizedModel)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_external_factory_contract() -> None:
    assert EXTERNAL_PREFIXES == ("torchvision", "timm")
    assert set(EXTERNAL_PREFIXES) == set(MODELS.prefixes())
    factory = external_factory("torchvision", "resnet18")
    params = inspect.signature(factory).parameters
    assert list(params)[:3] == ["num_classes", "in_channels", "image_size"]
    assert factory.__name__ == "torchvision:resnet18"
    with pytest.raises(ValueError, match="unknown model prefix 'keras'"):
        external_factory("keras", "resnet18")


def test_unknown_torchvision_name() -> None:
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet181'") as exc:
        external_factory("torchvision", "resnet181")
    assert "'resnet18'" in str(exc.value) and "torchvision.models.list_models()" in str(exc.value)
    with pytest.raises(ValueError, match=r"unknown torchvision model 'mobilenet_v3'.*'mobilenet_v3_small'"):
        torchvision_model("mobilenet_v3", num_classes=10, in_channels=3, image_size=32)
    # Through the registry (model.name=torchvision:resnet181): the same message, as a config error.
    with pytest.raises(PluginError, match=r"unknown torchvision model 'resnet181'"):
        MODELS.get("torchvision:resnet181")


def test_too_small_image_is_a_clear_error() -> None:
    # DenseNet-121's stem and transitions halve 28 px five times: 28 -> 7 -> 3 -> 1 -> 0.
    with pytest.raises(ValueError, match=r"torchvision model 'densenet121' cannot run on 1x28x28 inputs "
                                         r"\(in_channels=1, image_size=28\)"):
        torchvision_model("densenet121", num_classes=10, in_channels=1, image_size=28)
    # ViT-B/16 is given image_size, and refuses 28 (not a multiple of its patch size 16) when it is built.
    with pytest.raises(ValueError, match=r"torchvision model 'vit_b_16' could not be built .*image_size=28.*"
                                         r"patch size"):
        torchvision_model("vit_b_16", num_classes=10, in_channels=1, image_size=28)


def test_vit_gets_image_size() -> None:
    torch.manual_seed(0)
    model = torchvision_model("vit_b_32", num_classes=10, in_channels=3, image_size=32)
    assert model.image_size == 32
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_googlenet_aux_logits() -> None:
    model = torchvision_model("googlenet", num_classes=10, in_channels=3, image_size=32)
    assert model.aux_logits is False and model.aux1 is None
    with pytest.raises(ValueError, match=r"'googlenet' with aux_logits=True returns auxiliary outputs"):
        torchvision_model("googlenet", num_classes=10, in_channels=3, image_size=32, aux_logits=True)


def test_small_image_stem() -> None:
    small = torchvision_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = torchvision_model("resnet18", num_classes=10, in_channels=3, image_size=64)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    kept = torchvision_model("resnet18", num_classes=10, in_channels=3, image_size=32, small_image_stem=False)
    assert kept.conv1.kernel_size == (7, 7) and isinstance(kept.maxpool, nn.MaxPool2d)
    with pytest.raises(ValueError, match=r"'mobilenet_v3_small': small_image_stem=True, but it has no ResNet-like"):
        torchvision_model("mobilenet_v3_small", num_classes=10, in_channels=3, image_size=32, small_image_stem=True)


def test_in_channels_adapts_first_conv_weights() -> None:
    torch.manual_seed(0)
    ref = torchvision_model("mobilenet_v3_small", num_classes=10, in_channels=3, image_size=32)
    for in_channels in (1, 4):
        torch.manual_seed(0)  # the same init; only the first conv differs
        model = torchvision_model("mobilenet_v3_small", num_classes=10, in_channels=in_channels, image_size=32)
        old, new = _first_conv(ref), _first_conv(model)
        assert new is model.features[0][0]
        assert (new.in_channels, new.out_channels, new.kernel_size, new.stride, new.padding) == \
            (in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
        assert (new.bias is None) == (old.bias is None)
        expected = (old.weight.sum(1, keepdim=True) if in_channels == 1
                    else torch.cat([old.weight, old.weight[:, :1]], dim=1) * 3 / 4)
        torch.testing.assert_close(new.weight, expected)


def test_user_kwargs() -> None:
    model = torchvision_model("mobilenet_v3_small", num_classes=10, in_channels=3, image_size=32, dropout=0.5)
    assert model.classifier[2].p == 0.5
    # (MobileNetV3 itself swallows unknown keywords: torchvision's **kwargs.)
    with pytest.raises(TypeError, match=r"torchvision model 'resnet18': .*unexpected keyword argument "
                                        r"'not_an_arg'"):
        torchvision_model("resnet18", num_classes=10, in_channels=3, image_size=32, not_an_arg=1)


def test_weights_are_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """``weights`` reaches torchvision's builder (its state dict replaced here by a local one: no download), and
    then the ImageNet stem is kept for small images."""
    import torchvision
    from torchvision.models._api import WeightsEnum

    local = torchvision.models.resnet18(num_classes=1000).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **kw: local)
    model = torchvision_model("resnet18", num_classes=1000, in_channels=1, image_size=32, weights="IMAGENET1K_V1")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1
    torch.testing.assert_close(model.conv1.weight, local["conv1.weight"].sum(1, keepdim=True))
    # torchvision's rule: weights need their own number of classes.
    with pytest.raises(ValueError, match=r"'resnet18' could not be built .*num_classes"):
        torchvision_model("resnet18", num_classes=10, in_channels=3, image_size=32, weights="IMAGENET1K_V1")


def test_timm_model() -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = external_factory("timm", "resnet18")(num_classes=10, in_channels=1, image_size=28)
    out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert _first_conv(model).weight.grad is not None
    vit = timm_model("vit_tiny_patch16_224", num_classes=10, in_channels=3, image_size=32)  # given img_size
    assert tuple(vit.patch_embed.img_size) == (32, 32)
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet181'.*'resnet18'.*timm.list_models\(\)"):
        external_factory("timm", "resnet181")


_TIMM_MISSING = "timm is not installed: pip install timm (or pip install 'datkit[timm]')"


def test_timm_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ModuleNotFoundError
    with pytest.raises(ImportError) as exc:
        external_factory("timm", "resnet18")
    assert str(exc.value) == _TIMM_MISSING
    with pytest.raises(ImportError) as exc:
        timm_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    assert str(exc.value) == _TIMM_MISSING
    with pytest.raises(PluginError) as exc:  # model.name=timm:resnet18: a config error with the same message
        MODELS.get("timm:resnet18")
    assert str(exc.value) == _TIMM_MISSING
