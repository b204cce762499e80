"""``python -m datkit.certify``: sharded randomized-smoothing certification of a checkpoint (tiny 8x8 digits run).

- the output files (certify.tsv, certify.md, certify.png, results.json) and the certified-accuracy table;
- sigma defaults to the checkpoint's training sigma; results.json keeps a training run's entries;
- 2 workers under torchrun return exactly the rows of 1 worker (noise seeded per example index);
- bad input (sigma <= 0, n0 > n, alpha outside (0, 1), a checkpoint of another model) fails with a clear message.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datkit.certify import __main__ as certify_main
from datkit.certify.smoothing_report import COLUMNS, certified_accuracy, summary, update_results_json
from datkit.certify.smoothing_run import certify
from datkit.config import ConfigError, load_config
from datkit.preflight import validate_config
from helpers.runs import describe, one_thread, run_python, train_inprocess

SIGMA = 0.5  # the training sigma; certification inherits it
FAST = ["smoothing.n0=20", "smoothing.n=300", "smoothing.batch_size=150", "log.progress=false"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smooth_run")
    train_inprocess(["method.name=smoothing", f"smoothing.sigma={SIGMA}", "train.epochs=1", "train.max_steps=20",
                     "optim.lr=0.01", "log.plot=true", f"train.output_dir={out}"])
    return out / "checkpoint_last.pt"


def test_certified_accuracy_on_constructed_rows(tmp_path: Path) -> None:
    rows = [{"idx": i, "label": 1, "predict": p, "radius": r, "correct": p == 1, "time": 1.0}
            for i, (p, r) in enumerate([(1, 0.3), (1, 0.05), (2, 0.9), (-1, 0.0)])]
    assert certified_accuracy(rows, [0.0, 0.05, 0.1, 0.3, 0.31]) == [0.5, 0.5, 0.25, 0.25, 0.0]
    s = summary(rows, [0.0, 0.5])
    assert s["certified_accuracy"] == {"0": 0.5, "0.5": 0.0}
    assert s["ACR"] == pytest.approx((0.3 + 0.05) / 4) and s["abstain_rate"] == 0.25
    (tmp_path / "results.json").write_text("not json")
    update_results_json(str(tmp_path / "results.json"), {"a": 1})
    assert json.loads((tmp_path / "results.json").read_text()) == {"certify": {"a": 1}}
    assert (tmp_path / "results.json.bak").read_text() == "not json"


def _rows_without_time(res: dict) -> list[tuple]:
    return [tuple(r[c] for c in COLUMNS if c != "time") for r in res["rows"]]


def test_outputs_and_table(checkpoint: Path) -> None:
    res = certify([f"checkpoint={checkpoint}", "smoothing.num_samples=9", *FAST])
    out = checkpoint.parent / f"certify_sigma{SIGMA:g}"
    assert res["sigma"] == SIGMA and res["trained_with"] == f"smoothing (sigma {SIGMA:g})"
    assert res["num_examples"] == 9 and (res["n0"], res["n"]) == (20, 300)
    rows = res["rows"]
    assert [r["idx"] for r in rows] == sorted(r["idx"] for r in rows) and len({r["idx"] for r in rows}) == 9
    assert all(r["correct"] == (r["predict"] == r["label"]) for r in rows)
    assert all((r["predict"] == -1) == (r["radius"] == 0.0) for r in rows)
    radii = res["radii"]
    assert radii == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    acc = list(res["certified_accuracy"].values())
    assert acc == certified_accuracy(rows, radii) and acc == sorted(acc, reverse=True)
    assert acc[0] == sum(r["correct"] for r in rows) / 9

    lines = (out / "certify.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(COLUMNS) and len(lines) == 10
    first = lines[1].split("\t")
    assert int(first[0]) == rows[0]["idx"] and float(first[3]) == pytest.approx(rows[0]["radius"], abs=1e-6)
    table = (out / "certify.md").read_text()
    assert "| sigma | n images | r=0 | r=0.05 |" in table and "r=0.5 | ACR |" in table and "n=300" in table
    saved = json.loads((out / "results.json").read_text())["certify"]
    assert saved["certified_accuracy"] == res["certified_accuracy"] and saved["world_size"] == 1
    assert (out / "certify.png").stat().st_size > 1000


def test_seeded_reproducible_and_overridable(checkpoint: Path, tmp_path: Path) -> None:
    args = [f"checkpoint={checkpoint}", "smoothing.num_samples=4", *FAST]
    a = certify([*args, f"output_dir={tmp_path / 'a'}"])
    b = certify([*args, f"output_dir={tmp_path / 'b'}"])
    c = certify([*args, "smoothing.seed=1", "smoothing.sigma=0.25", "smoothing.radii=[0,0.1]",
                 f"output_dir={tmp_path / 'c'}"])
    assert _rows_without_time(a) == _rows_without_time(b)
    assert [r["radius"] for r in a["rows"]] != [r["radius"] for r in c["rows"]]
    assert c["sigma"] == 0.25 and list(c["certified_accuracy"]) == ["0", "0.1"]


def test_results_json_keeps_training_results(checkpoint: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text((checkpoint.parent / "results.json").read_text())
    certify([f"checkpoint={checkpoint}", "smoothing.num_samples=2", *FAST, f"output_dir={run_dir}"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert {"config", "epochs", "final", "certify"} <= set(saved) and saved["certify"]["num_examples"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_return_the_rows_of_one_worker(checkpoint: Path, tmp_path: Path) -> None:
    args = [f"checkpoint={checkpoint}", "smoothing.num_samples=7", *FAST]  # 7: the shards differ in size
    one = certify([*args, f"output_dir={tmp_path / 'one'}"])
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.certify",
                       *args, f"output_dir={tmp_path / 'two'}"], cwd=tmp_path, timeout=280)
    assert proc.returncode == 0, describe(proc)
    two = json.loads((tmp_path / "two" / "results.json").read_text())["certify"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    lines = (tmp_path / "two" / "certify.tsv").read_text().splitlines()[1:]
    rows_two = [tuple(ln.split("\t")[:5]) for ln in lines]
    rows_one = [(str(r["idx"]), str(r["label"]), str(r["predict"]), f"{r['radius']:.6f}", str(int(r["correct"])))
                for r in one["rows"]]
    assert rows_two == rows_one
    assert two["certified_accuracy"] == one["certified_accuracy"] and two["ACR"] == one["ACR"]
    # the rows are not all abstentions: the comparison covers radii
    assert any(r["radius"] > 0 for r in one["rows"]), one["rows"]


# --- bad input -----------------------------------------------------------------------------------------

def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        certify_main.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override, expected", [
    ("smoothing.sigma=0", "smoothing.sigma=0.0 must be > 0"),
    ("smoothing.sigma=-0.25", "smoothing.sigma=-0.25 must be > 0"),
    ("smoothing.n0=500", "smoothing.n0=500 must be <= smoothing.n=300"),
    ("smoothing.alpha=0", "smoothing.alpha=0.0 must be in (0, 1)"),
    ("smoothing.alpha=1.5", "smoothing.alpha=1.5 must be in (0, 1)"),
    ("smoothing.radii=[0.5,0.1]", "smoothing.radii=[0.5, 0.1] must be a non-empty increasing list"),
])
def test_bad_settings(override: str, expected: str, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert expected in _fails([f"checkpoint={checkpoint}", *FAST, override], capsys)


def test_checkpoint_of_another_model(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datkit.models import create_model

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["model"] = create_model("cnn_madry", 10, in_channels=1, image_size=8, mean=(0.3,), std=(0.4,),
                                  channels=[4, 8], hidden=16).state_dict()
    other = tmp_path / "madry.pt"
    torch.save(state, other)
    err = _fails([f"checkpoint={other}", *FAST], capsys)
    assert "do not fit model 'cnn_small'" in err and str(other) in err and "another model" in err, err
    # the right checkpoint certified as a model for other data (28x28 MNIST) fails the same way
    err = _fails([f"checkpoint={checkpoint}", "data.name=mnist5k", *FAST], capsys)
    assert "do not fit model 'cnn_small'" in err and "mnist5k" in err, err


def test_bad_command_lines(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in _fails([f"checkpoint={tmp_path / 'nope.pt'}"], capsys)
    assert "checkpoint=PATH is required" in _fails(["smoothing.n=10"], capsys)
    err = _fails([f"checkpoint={checkpoint}", "sigma=0.25"], capsys)
    assert "unknown option 'sigma'" in err and "smoothing.*" in err
    err = _fails(["mode=ibp_or_so", f"checkpoint={checkpoint}"], capsys)
    assert "mode='ibp_or_so' is not one of: smoothing" in err
    assert certify_main.main(["--help"]) == 0 and "smoothing.sigma" in capsys.readouterr().out


def test_config_validation_names_the_keys() -> None:
    cfg = load_config(None, ["smoothing.sigma=0", "smoothing.n0=10", "smoothing.n=5", "smoothing.alpha=1",
                             "smoothing.batch_size=0", "smoothing.num_noise=0"])
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    msg = str(exc.value)
    for key in ("smoothing.sigma", "smoothing.n0=10 must be <= smoothing.n=5", "smoothing.alpha",
                "smoothing.batch_size", "smoothing.num_noise"):
        assert key in msg, msg
    validate_config(load_config(None, []))  # the defaults are valid


@pytest.mark.slow
def test_cli_exit_code(checkpoint: Path, tmp_path: Path) -> None:
    proc = run_python(["-m", "datkit.certify", f"checkpoint={checkpoint}", "smoothing.sigma=0"], cwd=tmp_path,
                      timeout=120)
    assert proc.returncode == 2 and "smoothing.sigma=0.0 must be > 0" in proc.stderr, describe(proc)
