"""Tests of ``python -m datkit.evaluate`` on the checkpoint of a tiny training run (8x8 digits)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datkit import evaluate
from datkit.train import main as train_main
from helpers.runs import one_thread

TINY = ["data.name=digits", "model.kwargs.channels=[8,16]", "model.kwargs.hidden=32", "train.epochs=1",
        "train.max_steps=5", "eval.num_samples=20", "eval.final_num_samples=20", "eval.pgd_steps=2",
        "log.tensorboard=false", "log.plot=false", "log.progress=false", "device=cpu"]



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared CI machine, oversubscribed OpenMP threads are ~10x slower."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train_main(TINY + [f"train.output_dir={out}"])
    path = out / "checkpoint_last.pt"
    assert path.is_file()
    return path


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of an evaluation that must fail at start-up."""
    with pytest.raises(SystemExit) as exc:
        evaluate.evaluate(args)
    return exc.value.code, capsys.readouterr().err


def _recomputed_ta(checkpoint: Path, num_samples: int) -> float:
    """Clean accuracy of the checkpoint's weights on ``eval_subset``'s examples: a plain forward pass."""
    from omegaconf import OmegaConf

    from datkit.data.loaders import build_data, eval_subset
    from datkit.engine.run import build_model

    cfg = OmegaConf.create(json.loads((checkpoint.parent / "results.json").read_text())["config"])
    data = build_data(cfg.data)
    model = build_model(cfg, data.spec)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    model.eval()
    idx = eval_subset(len(data.test), num_samples, seed=cfg.train.seed)
    x = torch.stack([data.test[i][0] for i in idx])
    y = torch.tensor([int(data.test[i][1]) for i in idx])
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(idx)


def test_cli_pgd_writes_json_and_table(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev.json"
    proc = subprocess.run([sys.executable, "-m", "datkit.evaluate", f"checkpoint={checkpoint}", "attacks=[pgd]",
                           "num_samples=50", f"output={out}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "| n | TA | RA |" in proc.stdout and "PGD-20" in proc.stdout
    res = json.loads(out.read_text())
    assert res["n"] == 50 and res["epoch"] == 1 and res["model"] == "cnn_small" and res["data"] == "digits"
    assert 0.0 <= res["RA"] <= res["TA"] <= 1.0
    # the fixture's 5 steps leave the model at chance (TA 0.04 here), so no lower bound above chance holds: TA is
    # recomputed instead from the checkpoint's weights on the same 50 examples, without datkit's evaluation
    assert res["TA"] == pytest.approx(_recomputed_ta(checkpoint, 50), abs=1e-9), res["TA"]
    ra = res["attacks"]["RA"]
    assert (ra["attack"], ra["steps"], ra["restarts"], ra["eps"]) == ("pgd", 20, 1, 0.3)
    assert ra["alpha"] == pytest.approx(2.5 * 0.3 / 20) and ra["seconds"] >= 0
    assert "AA" not in res
    assert out.with_suffix(".md").read_text().startswith("Evaluation of")


def test_default_output_next_to_checkpoint_and_options(checkpoint: Path) -> None:
    res = evaluate.evaluate([f"checkpoint={checkpoint}", "attacks=pgd,fgsm", "num_samples=10", "pgd_steps=3",
                         "eps=8/255", "eval.pgd_restarts=2", "batch_size=4"])
    assert res["n"] == 10 and set(res["attacks"]) == {"TA", "RA", "FGSM"}
    assert res["attacks"]["RA"]["steps"] == 3 and res["attacks"]["RA"]["restarts"] == 2
    assert res["attacks"]["RA"]["eps"] == pytest.approx(8 / 255) == res["attacks"]["FGSM"]["eps"]
    saved = json.loads((checkpoint.parent / "evaluation.json").read_text())
    assert saved["TA"] == res["TA"] and saved["n"] == 10


def test_autoattack_on_a_few_samples(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchattacks")
    res = evaluate.evaluate([f"checkpoint={checkpoint}", "attacks=[pgd,autoattack]", "num_samples=8", "pgd_steps=5",
                         f"output={tmp_path / 'aa.json'}"])
    assert res["n"] == 8 and res["AA"] <= res["TA"]
    assert res["attacks"]["AA"]["version"] == "standard"


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main([f"checkpoint={tmp_path / 'nope.pt'}", "attacks=[pgd]"], capsys)
    assert code == 2 and "does not exist" in err and "nope.pt" in err


def test_unknown_attack(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main([f"checkpoint={checkpoint}", "attacks=[pgd,cw]"], capsys)
    assert code == 2 and "unknown attack(s) 'cw'" in err and "clean, pgd, autoattack, fgsm" in err


def test_unknown_option(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main([f"checkpoint={checkpoint}", "steps=3"], capsys)
    assert code == 2 and "unknown option 'steps'" in err and "pgd_steps" in err


def test_weights_that_do_not_fit_the_model(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main([f"checkpoint={checkpoint}", "attacks=[pgd]", "model.kwargs.hidden=64"], capsys)
    assert code == 2 and "do not fit model 'cnn_small'" in err and str(checkpoint) in err


def test_autoattack_without_torchattacks(checkpoint: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    code, err = run_main([f"checkpoint={checkpoint}", "attacks=[autoattack]"], capsys)
    assert code == 2 and 'pip install "datkit[autoattack]"' in err


def test_verified_accuracy_by_the_cascade(checkpoint: Path, tmp_path: Path) -> None:
    """``attacks=verified``: VA by ``bounds.verify`` on any checkpoint, = the cascade run directly on the same images;
    the per-stage gains sum to VA, and the JSON and Markdown carry them."""
    from omegaconf import OmegaConf

    from datkit.certify.cascade import run_cascade
    from datkit.data.loaders import build_data, eval_subset
    from datkit.engine.run import build_model

    out = tmp_path / "ev.json"
    res = evaluate.evaluate([f"checkpoint={checkpoint}", "attacks=[pgd,verified]", "num_samples=20", "pgd_steps=3",
                             "eps=0.01", "bounds.verify=[ibp,crown-ibp,crown]", f"output={out}"])
    cfg = OmegaConf.create(json.loads((checkpoint.parent / "results.json").read_text())["config"])
    data = build_data(cfg.data)
    model = build_model(cfg, data.spec)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    model.eval()
    idx = eval_subset(len(data.test), 20, seed=cfg.train.seed)
    x = torch.stack([data.test[i][0] for i in idx])
    y = torch.tensor([int(data.test[i][1]) for i in idx])
    direct = run_cascade(model, x, y, 0.01, ["ibp", "crown-ibp", "crown"])
    assert res["VA"] == pytest.approx(float(direct.verified.float().mean())) and res["VA"] > 0
    gains = [res[f"VA_gain_{s}"] for s in ("ibp", "crown-ibp", "crown")]
    assert sum(gains) == pytest.approx(res["VA"]) and res["VA"] <= res["RA"] + 1e-9
    assert json.loads(out.read_text())["VA_gain_crown"] == res["VA_gain_crown"]
    assert "| crown | +" in out.with_suffix(".md").read_text()
