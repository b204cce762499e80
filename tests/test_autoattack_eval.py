"""AA in the final evaluation (``datkit.engine.autoattack_eval``): only images that survive clean inference and the
RA attack (PGD) reach AutoAttack, the survivors are dealt out evenly over the workers, AA = survivors / n."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from datkit.attacks import Attack
from datkit.engine.autoattack_eval import evaluate_autoattack
from datkit.engine.evaluate import shard_batches


class OneWorker(SimpleNamespace):
    def __init__(self) -> None:
        super().__init__(rank=0, world_size=1, is_main=True, device=torch.device("cpu"))

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t


class ByPixel(nn.Module):
    """Predicts class 1 when the first pixel is > 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (x.flatten(1)[:, :1] > 0.5).float()
        return torch.cat([1 - p, p], dim=1)


class Flip(Attack):
    """Flips the first pixel of the images whose second pixel is > 0.5 (they are "not robust"); records its inputs."""

    def __init__(self) -> None:
        super().__init__(0.3)
        self.seen: list[torch.Tensor] = []

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        out = x.clone()
        flip = out[:, 0, 0, 1] > 0.5
        out[flip, 0, 0, 0] = 1 - out[flip, 0, 0, 0]
        return out


def _data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 2, 2, generator=g)
    y = (x[:, 0, 0, 0] > 0.5).long()
    y[:5] = 1 - y[:5]  # 5 images misclassified clean
    return TensorDataset(x, y)


def test_only_pgd_robust_images_reach_autoattack_and_aa_counts_its_survivors() -> None:
    data = _data()
    x, y = data.tensors
    pgd, aa = Flip(), Flip()
    # the second pixel decides "robust" for both attacks: AutoAttack should break none of what PGD left
    out = evaluate_autoattack(OneWorker(), ByPixel(), data, list(range(40)), batch_size=16, pgd=pgd, autoattack=aa)
    clean_ok = (x[:, 0, 0, 0] > 0.5).long() == y
    robust = clean_ok & ~(x[:, 0, 0, 1] > 0.5)
    attacked = torch.cat(aa.seen)
    assert len(attacked) == int(robust.sum()) == out["n_aa_attacked"]
    assert torch.equal(attacked, x[robust])  # exactly the PGD-robust images, in order
    assert out["AA"] == pytest.approx(int(robust.sum()) / 40) and out["n_aa"] == 40
    # a stronger AutoAttack (flips everything) breaks all of them
    class All(Flip):
        def perturb(self, model, x, y):
            out = x.clone()
            out[:, 0, 0, 0] = 1 - out[:, 0, 0, 0]
            return out

    assert evaluate_autoattack(OneWorker(), ByPixel(), data, list(range(40)), 16, Flip(), All())["AA"] == 0.0


@pytest.mark.parametrize("n,world", [(0, 2), (7, 2), (433, 2), (100, 3), (5, 8)])
def test_survivors_are_dealt_out_evenly(n: int, world: int) -> None:
    items = list(range(1000, 1000 + n))
    shares = [sum(shard_batches(items, r, world, 50 * world), []) for r in range(world)]
    assert sorted(sum(shares, [])) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(len(b) <= 50 for r in range(world) for b in shard_batches(items, r, world, 50 * world))


def test_the_final_evaluations_outcomes_replace_the_pgd_pass() -> None:
    """Trainer and datkit.evaluate hand AA the final evaluation's per-image outcomes: PGD does not run again, and
    AA is the same as with its own PGD pass."""
    from datkit.engine.evaluate import evaluate_per_image

    data, idx = _data(), list(range(40))
    _, per_image = evaluate_per_image(OneWorker(), ByPixel(), data, idx, 16, {"TA": None, "RA": Flip()})
    pgd, aa, aa_ref = Flip(), Flip(), Flip()
    out = evaluate_autoattack(OneWorker(), ByPixel(), data, idx, 16, pgd, aa, robust=per_image["TA"] & per_image["RA"])
    ref = evaluate_autoattack(OneWorker(), ByPixel(), data, idx, 16, Flip(), aa_ref)
    assert pgd.seen == [] and len(aa.seen) > 0
    assert torch.equal(torch.cat(aa.seen), torch.cat(aa_ref.seen))
    assert {k: out[k] for k in ("AA", "n_aa", "n_aa_attacked")} == {k: ref[k] for k in ("AA", "n_aa", "n_aa_attacked")}


def test_per_image_outcomes_give_every_subsets_accuracy() -> None:
    from datkit.engine.evaluate import evaluate_accuracy, evaluate_per_image, subset_accuracy

    data = _data()
    idx = list(range(3, 40))
    full, per_image = evaluate_per_image(OneWorker(), ByPixel(), data, idx, 16, {"TA": None, "RA": Flip()})
    assert sum(per_image["TA"].tolist()) / len(idx) == pytest.approx(full["TA"])
    for subset in ([3, 4, 5, 6, 7, 30], list(range(10, 40, 3))):
        direct = evaluate_accuracy(OneWorker(), ByPixel(), data, subset, 4, {"TA": None, "RA": Flip()})
        assert subset_accuracy(per_image, idx, subset) == direct
    assert subset_accuracy(per_image, idx, [0, 5]) is None  # 0 was not evaluated
