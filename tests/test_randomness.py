"""Per-sample keyed randomness (``datkit.randomness``): a sample's noise does not depend on the batch it is in.

The end-to-end claim (2 workers x B == 1 worker x 2B with the default recipe, with and without gradient
accumulation) is checked in ``test_distributed.py``; here are the pieces, in one process.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from datkit import randomness
from datkit.attacks import FGSM, PGD
from datkit.data import MixedBatchSampler, ShardedBatchSampler, random_shift
from datkit.methods.trades import trades_attack


def _keys(n: int = 8, epoch: int = 1) -> list[int]:
    return randomness.sample_keys(3, epoch, range(n))


def _split(fn, x: torch.Tensor, keys: list[int], parts: list[slice]) -> torch.Tensor:
    """``fn(x[part])`` under each part's keys, concatenated in the order of ``parts``."""
    out = []
    for part in parts:
        with randomness.keyed(keys[part]):
            out.append(fn(x[part]))
    return torch.cat(out)


def test_a_samples_draw_depends_on_its_key_only() -> None:
    x, keys = torch.zeros(8, 1, 4, 4), _keys()
    with randomness.keyed(keys):
        whole = randomness.rand(x.shape, x)
    halves = _split(lambda t: randomness.rand(t.shape, t), x, keys, [slice(4, 8), slice(0, 4)])
    assert torch.equal(halves, torch.cat([whole[4:], whole[:4]]))
    assert not torch.equal(whole[0], whole[1])  # different samples, different noise
    with randomness.keyed(_keys(epoch=2)):
        assert not torch.equal(randomness.rand(x.shape, x), whole)  # another epoch, other noise


def test_draws_in_a_scope_differ_and_nested_scopes_continue_the_count() -> None:
    x, keys = torch.zeros(4, 3), _keys(4)
    with randomness.keyed(keys):
        first, second = randomness.rand(x.shape, x), randomness.rand(x.shape, x)
    assert not torch.equal(first, second)
    with randomness.keyed(keys):
        randomness.rand(x.shape, x)  # e.g. the random shift of the whole local batch
        with randomness.keyed(keys[:2]):  # a micro-batch: its first draw is the batch's second
            micro = randomness.rand((2, 3), x)
        with randomness.keyed(keys[2:]):
            micro2 = randomness.rand((2, 3), x)
    assert torch.equal(torch.cat([micro, micro2]), second)


def test_outside_a_scope_or_for_other_shapes_the_global_rng_draws() -> None:
    x = torch.zeros(4, 3)
    torch.manual_seed(0)
    a = randomness.rand(x.shape, x)
    torch.manual_seed(0)
    assert torch.equal(a, torch.rand(4, 3))
    with randomness.keyed(_keys(4)):
        torch.manual_seed(0)
        b = randomness.randn((5, 3), x)  # first dim is not the batch
    torch.manual_seed(0)
    assert torch.equal(b, torch.randn(5, 3))


def test_keys_are_distinct_and_reproducible() -> None:
    keys = randomness.sample_keys(0, 1, range(10_000)) + randomness.sample_keys(0, 2, range(10_000))
    keys += (randomness.sample_keys(1, 1, range(10_000))
             + randomness.sample_keys(0, randomness.EVAL_STREAM, range(10_000)))
    assert len(set(keys)) == len(keys)
    assert randomness.sample_keys(7, 3, [5]) == randomness.sample_keys(7, 3, torch.tensor([5]))


def test_normal_draws_are_standard_normal() -> None:
    x = torch.zeros(2000, 50)
    with randomness.keyed(_keys(2000)):
        z = randomness.randn(x.shape, x)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


@pytest.mark.parametrize("attack", [PGD(eps=0.3, alpha=0.1, steps=2), PGD(eps=1.0, alpha=0.3, steps=2, norm="l2"),
                                    FGSM(eps=0.3)], ids=["pgd_linf", "pgd_l2", "fgsm"])
def test_attacks_random_start_is_the_same_in_any_split(attack) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, y, keys = torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,)), _keys()
    with randomness.keyed(keys):
        whole = attack(model, x, y)
    parts = [slice(0, 3), slice(3, 8)]
    split = _split(lambda t: attack(model, t, y[parts[0]] if len(t) == 3 else y[parts[1]]), x, keys, parts)
    # the same start per sample; the gradient steps after it are the same up to rounding: a matrix product over a
    # batch of 3 and one of 8 may use different kernels (bit-equal on Intel AVX-512 here, 1 ulp apart on an AMD
    # EPYC for the l2 step's normalization), so 1e-6, far below any difference of starts (~eps)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)
    with randomness.keyed(_keys(epoch=2)):
        other = attack(model, x, y)
        assert (other - whole).abs().max() > 1e-2  # the start is random (keys matter)


def test_trades_start_and_random_shift_are_the_same_in_any_split() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, keys = torch.rand(8, 1, 4, 4), _keys()
    for fn in (lambda t: trades_attack(model, t, 0.3, 0.1, 1), lambda t: random_shift(t, 1)):
        with randomness.keyed(keys):
            whole = fn(x)
        assert torch.equal(_split(fn, x, keys, [slice(0, 5), slice(5, 8)]), whole)


def _global_order(samplers, step: int) -> dict[int, int]:
    """{global position: dataset index} of ``step`` over all workers' samplers."""
    out: dict[int, int] = {}
    for s in samplers:
        batch = list(iter(s))[step]
        positions = s.positions(step)
        assert len(positions) == len(batch)
        for p, i in zip(positions, batch):
            assert p not in out
            out[p] = i
    return out


@pytest.mark.parametrize("kind", ["sharded", "mixed"])
def test_positions_name_the_same_sample_whichever_worker_holds_it(kind: str) -> None:
    def make(rank: int, world: int):
        if kind == "sharded":
            s = ShardedBatchSampler(100, 12, rank, world, seed=4)
        else:
            s = MixedBatchSampler(60, 40, 12, 0.5, rank, world, seed=4)
        s.set_epoch(2)
        return s

    for step in (0, 3):
        one = _global_order([make(0, 1)], step)
        assert sorted(one) == list(range(step * 12, step * 12 + 12))
        for world in (2, 3):
            assert _global_order([make(r, world) for r in range(world)], step) == one
