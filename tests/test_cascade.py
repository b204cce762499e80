"""The verification cascade of evaluation (``bounds.verify``, ``datkit.certify.cascade``).

- ``[ibp, crown-ibp, crown]`` verifies exactly the union of what each stage verifies alone (on the clean-correct
  examples), and on this trained net each stage adds examples;
- stage k receives exactly the examples that the stages before it left (clean-misclassified ones never);
- through ``evaluate_per_image`` (the Metric protocol's extra columns) the per-stage gains sum to VA, an old-style
  metric without columns still works next to it, and ``VA_gap`` = RA - VA;
- legacy strings still work; bad stage names fail with one line naming ``bounds.verify`` and the allowed values;
- results.md shows the cascade table.
(One vs two workers: ``tests/test_distributed_certified.py`` runs the cascade in its crown-ibp runs.)
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from datkit.certify import cascade
from datkit.certify.bounds import verified
from datkit.certify.cascade import STAGES, VerifiedAccuracy, run_cascade, stage_verified, stages_of, verify_errors
from datkit.config import ConfigError, load_config
from datkit.models import Normalize, NormalizedModel
from datkit.preflight import validate_config
from helpers.runs import one_thread

EPS = 0.05  # here IBP verifies 9 of 64, CROWN-IBP 53, CROWN 60


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@functools.lru_cache(maxsize=1)
def trained_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 16-32-32-32-3 ReLU net fitted to 3 clusters and 64 of its training points; example 0 gets a wrong label."""
    torch.manual_seed(0)
    net = NormalizedModel(Normalize((0.3,), (0.4,)), nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 3)))
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(3, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (256,), generator=g)
    x = (centers[y] + 0.15 * torch.randn(256, 1, 4, 4, generator=g)).clamp(0, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    x, y = x[:64], y[:64].clone()
    y[0] = (net(x[:1]).argmax(1).item() + 1) % 3  # misclassified: the cascade must skip it
    return net, x, y


def test_cascade_verifies_the_union_of_its_stages() -> None:
    net, x, y = trained_net()
    res = run_cascade(net, x, y, EPS, STAGES)
    with torch.no_grad():
        correct = net(x).argmax(1) == y
        alone = {s: stage_verified(net, x, y, EPS, s) for s in STAGES}
    union = (alone["ibp"] | alone["crown-ibp"] | alone["crown"]) & correct
    assert torch.equal(res.verified, union)
    gains = [int((res.stage == k).sum()) for k in range(3)]
    assert all(g > 0 for g in gains), f"each stage should add examples here: {gains}"
    assert not bool(res.verified[0]) and res.received[0] == int(correct.sum()) == 63


def test_a_falsifier_before_full_crown_saves_work_and_changes_nothing() -> None:
    """A PGD that breaks an example proves it unverifiable: the crown stage receives fewer, VA is the same."""
    from datkit.attacks import PGD

    net, x, y = trained_net()
    plain = run_cascade(net, x, y, 3 * EPS, STAGES)
    pgd = PGD(eps=3 * EPS, alpha=3 * EPS / 4, steps=10, random_start=False, eval_mode=True)
    falsified = run_cascade(net, x, y, 3 * EPS, STAGES, falsifier=pgd)
    assert torch.equal(falsified.verified, plain.verified) and torch.equal(falsified.stage, plain.stage)
    assert falsified.received[:2] == plain.received[:2]
    assert falsified.received[2] < plain.received[2], (falsified.received, plain.received)


def test_each_stage_receives_only_what_earlier_stages_left(monkeypatch: pytest.MonkeyPatch) -> None:
    net, x, y = trained_net()
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def recording(model, xs, ys, eps, stage, *args):
        ok = stage_verified(model, xs, ys, eps, stage, *args)
        seen.append((stage, xs.clone(), ok.clone()))
        return ok

    monkeypatch.setattr(cascade, "stage_verified", recording)
    res = run_cascade(net, x, y, EPS, STAGES)
    with torch.no_grad():
        left = (net(x).argmax(1) == y).nonzero().squeeze(1)
    assert [s for s, _, _ in seen] == list(STAGES)
    for k, (stage, xs, ok) in enumerate(seen):
        assert torch.equal(xs, x[left]), f"stage {stage} got other examples than the earlier stages left"
        assert res.received[k] == len(xs) and bool(ok.any())
        left = left[~ok]
    assert int(res.verified.sum()) == sum(int(ok.sum()) for _, _, ok in seen)


class _Backend:
    rank, world_size, device = 0, 1, torch.device("cpu")

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t


class _OldMetric:
    """A plug-in metric of the original protocol (no extra columns)."""

    def correct(self, model, x, y) -> int:
        return int((model(x).argmax(1) == y).sum())


def test_gains_sum_to_va_in_evaluation() -> None:
    from datkit.engine.evaluate import evaluate_per_image

    net, x, y = trained_net()
    va = VerifiedAccuracy(EPS, ["ibp", "crown-ibp", "crown"])
    columns = {"TA": None, "RA": lambda m, xs, ys: xs, "VA": va, "old": _OldMetric()}  # RA: the identity "attack"
    out, _ = evaluate_per_image(_Backend(), net, TensorDataset(x, y), list(range(64)), 16, columns)
    gains = [out[f"VA_gain_{s}"] for s in STAGES]
    assert sum(gains) == pytest.approx(out["VA"], abs=1e-12) and all(g > 0 for g in gains)
    assert out["VA"] == pytest.approx(float(run_cascade(net, x, y, EPS, STAGES).verified.double().mean()))
    assert out["VE"] == pytest.approx(1 - out["VA"]) and out["old"] == out["TA"] == pytest.approx(63 / 64)
    assert out["VA_gap"] == pytest.approx(out["RA"] - out["VA"]) and all(out[f"VA_time_{s}_s"] >= 0 for s in STAGES)


def test_legacy_values_keep_their_meaning() -> None:
    net, x, y = trained_net()
    assert stages_of("ibp") == ("ibp",) and stages_of("crown-ibp") == ("ibp", "crown-ibp")
    for legacy in ("ibp", "crown-ibp"):  # the former VerifiedAccuracy: verified() on every example
        assert VerifiedAccuracy(EPS, legacy).correct(net, x, y) == int(verified(net, x, y, EPS, legacy).sum())
    for value in ("ibp", "crown-ibp", "[ibp,crown-ibp,crown]", "[crown]"):
        cfg = load_config(None, ["method.name=ibp", f"bounds.verify={value}"])
        validate_config(cfg)
        from datkit.methods import create_method

        assert create_method(cfg).eval_metrics()["VA"].stages == stages_of(cfg.bounds.verify)
    assert load_config(None, ["method.name=ibp"]).bounds.verify == ["ibp"]


@pytest.mark.parametrize("value", ["[ibp,lp]", "alpha", "[]", "[ibp,ibp]"])
def test_bad_stages_fail_with_one_line(value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate_config(load_config(None, ["method.name=ibp", f"bounds.verify={value}"]))
    lines = [ln for ln in str(exc.value).splitlines() if "bounds.verify" in ln]
    assert len(lines) == 1 and "ibp, crown-ibp, crown" in lines[0], str(exc.value)



def test_verified_accuracy_refuses_unknown_stages() -> None:
    with pytest.raises(ValueError, match=r"bounds\.verify.*'lp'.*allowed"):
        VerifiedAccuracy(0.1, ["ibp", "lp"])


def test_auto_lirpa_allows_ibp_and_crown_ibp_stages_only() -> None:
    assert verify_errors(["ibp", "crown-ibp"], "auto_lirpa") == []
    (msg,) = verify_errors(["ibp", "crown"], "auto_lirpa")
    assert "bounds.verify" in msg and "auto_lirpa" in msg and "bounds.engine=native" in msg


def test_results_markdown_shows_the_cascade() -> None:
    from datkit.engine.results import markdown_table

    final = {"TA": 0.9, "RA": 0.8, "VA": 0.7, "VE": 0.3, "VA_gap": 0.1, "n": 100, "eps": 0.1, "VA_gain_ibp": 0.4,
             "VA_gain_crown-ibp": 0.25, "VA_gain_crown": 0.05, "VA_time_ibp_s": 0.5, "VA_time_crown-ibp_s": 1.0,
             "VA_time_crown_s": 4.0}
    md = markdown_table([{"epoch": 1, "TA": 0.9, "RA": 0.8, "VA": 0.7, "VA_gap": 0.1}], final)
    for line in ("| ibp | +0.4000 | 0.50 |", "| crown-ibp | +0.2500 | 1.00 |", "| crown | +0.0500 | 4.00 |",
                 "| **VA** (all stages) | **0.7000** | 5.50 |", "| unresolved gap RA - VA | 0.1000 | |"):
        assert line in md, md
    assert "| RA - VA |" in md
