"""torchvision datasets for users with the data (or internet for ``data.download=true``).

``mnist``, ``cifar10``, ``cifar100``, ``svhn`` come from ``torchvision.datasets`` under ``data.root``;
``imagenet`` and ``tinyimagenet`` are ImageFolder trees ``<root>/<name>/{train,val}/<class>/*``.
Training transforms are the standard augmentations of the AT literature (random crop + flip for
CIFAR, random-resized crop for ImageNet); evaluation transforms are deterministic. Tensors in [0, 1].
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .spec import DatasetSpec, register_dataset

CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _tv() -> Any:
    import torchvision  # lazy: torchvision is only needed for these datasets

    return torchvision


def _small_transforms(size: int, crop: bool, flip: bool) -> tuple[Callable, Callable]:
    T = _tv().transforms
    train = [T.RandomCrop(size, padding=size // 8)] if crop else []
    train += [T.RandomHorizontalFlip()] if flip else []
    return T.Compose(train + [T.ToTensor()]), T.ToTensor()


def build_mnist(root: str, download: bool, **_: object):
    """torchvision MNIST (60k train / 10k test)."""
    ds = _tv().datasets
    T = _tv().transforms
    return (ds.MNIST(root, train=True, download=download, transform=T.ToTensor()),
            ds.MNIST(root, train=False, download=download, transform=T.ToTensor()))


def _build_cifar(cls_name: str) -> Callable:
    def build(root: str, download: bool, **_: object):
        cls = getattr(_tv().datasets, cls_name)
        tr, te = _small_transforms(32, crop=True, flip=True)
        return (cls(root, train=True, download=download, transform=tr),
                cls(root, train=False, download=download, transform=te))

    build.__doc__ = f"torchvision {cls_name} with random crop (pad 4) + horizontal flip for training."
    return build


def build_svhn(root: str, download: bool, **_: object):
    """torchvision SVHN (train / test splits), random crop for training (no flips: digits)."""
    tr, te = _small_transforms(32, crop=True, flip=False)
    ds = _tv().datasets
    return (ds.SVHN(root, split="train", download=download, transform=tr),
            ds.SVHN(root, split="test", download=download, transform=te))


def _build_folder(name: str, size: int) -> Callable:
    def build(root: str, **_: object):
        T = _tv().transforms
        base = os.path.join(root, name)
        if size >= 224:
            tr = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
            te = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
        else:
            tr = T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor()])
            te = T.ToTensor()
        ds = _tv().datasets
        return ds.ImageFolder(os.path.join(base, "train"), tr), ds.ImageFolder(os.path.join(base, "val"), te)

    build.__doc__ = f"ImageFolder tree <root>/{name}/{{train,val}}/<class>/ at {size}x{size}."
    return build


def _check_folder(name: str) -> Callable:
    def check(root: str, **_: object) -> None:
        for split in ("train", "val"):
            d = os.path.join(root, name, split)
            if not os.path.isdir(d):
                raise FileNotFoundError(f"data.name={name}: folder {d} not found "
                                        f"(expected <data.root>/{name}/{{train,val}}/<class>/*)")

    return check


def _check_torchvision(folder: str) -> Callable:
    def check(root: str, download: bool, **_: object) -> None:
        if not download and not os.path.isdir(os.path.join(root, folder)) and not any(
            f.startswith(folder.lower()) for f in (os.listdir(root) if os.path.isdir(root) else [])
        ):
            raise FileNotFoundError(
                f"dataset files not found under data.root={root!r} (looked for {folder}); set data.download=true "
                "on a machine with internet, or point data.root at the folder that holds them")

    return check


register_dataset(DatasetSpec("mnist", 10, 1, 28, (0.1307,), (0.3081,), build_mnist, mnist_like=True,
                             check=_check_torchvision("MNIST")))
register_dataset(DatasetSpec("cifar10", 10, 3, 32, *CIFAR10, _build_cifar("CIFAR10"),
                             check=_check_torchvision("cifar-10")))
register_dataset(DatasetSpec("cifar100", 100, 3, 32, *CIFAR100, _build_cifar("CIFAR100"),
                             check=_check_torchvision("cifar-100")))
register_dataset(DatasetSpec("svhn", 10, 3, 32, *SVHN, build_svhn, check=_check_torchvision("train_32x32.mat")))
register_dataset(DatasetSpec("imagenet", 1000, 3, 224, *IMAGENET, _build_folder("imagenet", 224),
                             check=_check_folder("imagenet")))
register_dataset(DatasetSpec("tinyimagenet", 200, 3, 64, *IMAGENET, _build_folder("tinyimagenet", 64),
                             check=_check_folder("tinyimagenet")))
