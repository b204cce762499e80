"""The catastrophic-overfitting check (``datkit.engine.overfitting``): PGD accuracy on fixed training examples
after every epoch; a fall of more than ``eval.co_drop`` below the best stops training (``stop``) or is recorded
(``warn``), and results.json says so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from datkit.engine import overfitting
from helpers.runs import train_inprocess

SCRIPT = [0.50, 0.80, 0.30, 0.75]  # the probe's accuracy after epochs 1..4: epoch 3 falls 0.5 below the best


@pytest.fixture()
def scripted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The probe's evaluation returns SCRIPT's values in turn; the list records how often it ran."""
    calls: list[int] = []

    def fake(backend, model, data, indices, batch_size, attacks, seed=0):
        assert list(attacks) == ["co_RA", "co_own"] and len(indices) == 32 and len(data) > 1000  # the training set
        calls.append(len(indices))
        acc = SCRIPT[len(calls) - 1]
        return {"co_RA": acc, "co_own": acc + 0.1, "n": len(indices)}

    monkeypatch.setattr(overfitting, "evaluate_accuracy", fake)
    return calls


@pytest.mark.parametrize("action,epochs", [("stop", 3), ("warn", 4)])
def test_a_collapse_of_the_probe_stops_or_is_recorded(action: str, epochs: int, scripted: list[int], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    final = train_inprocess(["train.epochs=4", "train.max_steps=1", f"eval.co_action={action}",
                             f"train.output_dir={tmp_path}"])
    records = json.loads((tmp_path / "results.json").read_text())["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1)) and len(scripted) == epochs
    assert [r["co_RA"] for r in records] == SCRIPT[:epochs]
    assert [bool(r.get("co_fired")) for r in records] == [False, False, True, False][:epochs]
    assert [r["co_own"] for r in records] == [v + 0.1 for v in SCRIPT[:epochs]]
    assert final["catastrophic_overfitting"] == {
        "epoch": 3, "co_RA": 0.30, "co_own": 0.40, "best": 0.80, "action": action,
        "why": "PGD-10 accuracy fell from its best 0.8000 to 0.3000"}
    assert "catastrophic overfitting at epoch 3" in capsys.readouterr().out
    assert "Catastrophic overfitting" in (tmp_path / "results.md").read_text()


def test_a_probe_that_only_dips_does_not_fire(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = iter([0.50, 0.80, 0.65])  # 0.15 below the best: under eval.co_drop=0.2
    monkeypatch.setattr(overfitting, "evaluate_accuracy",
                        lambda *a, **k: (lambda v: {"co_RA": v, "co_own": v + 0.19, "n": 32})(next(values)))
    final = train_inprocess(["train.epochs=3", "train.max_steps=1", f"train.output_dir={tmp_path}"])
    assert "catastrophic_overfitting" not in final and final["epochs"] == 3


def test_robust_to_its_own_attack_only_fires_before_any_robustness(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """FGSM at eps 0.3 on MNIST collapses inside the eps ramp: PGD accuracy never rises, so it cannot fall; the
    gap to the training attack's accuracy on the same examples shows it."""
    values = iter([(0.01, 0.05), (0.02, 0.35), (0.01, 0.60)])  # (PGD, own attack)
    monkeypatch.setattr(overfitting, "evaluate_accuracy",
                        lambda *a, **k: (lambda v: {"co_RA": v[0], "co_own": v[1], "n": 32})(next(values)))
    final = train_inprocess(["train.epochs=3", "train.max_steps=1", "method.name=fgsm", f"train.output_dir={tmp_path}"])
    co = final["catastrophic_overfitting"]
    assert co["epoch"] == 2 and co["why"].startswith("PGD-10 accuracy 0.0200 is 0.33 below the accuracy under the "
                                                     "training attack (0.3500)"), co
    assert final["epochs"] == 3 and len(json.loads((tmp_path / "results.json").read_text())["epochs"]) == 2


def test_the_probe_uses_the_methods_own_attack_at_the_eval_eps() -> None:
    from datkit.attacks import FGSM, PGD
    from datkit.config import load_config
    from datkit.methods import create_method

    for name, kind in (("fgsm", FGSM), ("pgd", PGD), ("clean", type(None))):
        cfg = load_config(None, [f"method.name={name}", "eval.eps=0.25"])
        check = overfitting.OverfittingCheck(cfg, None, None, list(range(5000)), [], create_method(cfg))
        assert isinstance(check.own, kind) and isinstance(check.attack, PGD) and check.attack.eps == 0.25
        assert check.own is None or check.own.eps == 0.25
