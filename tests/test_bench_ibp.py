"""``python -m datkit.bench ibp``: the CLI runs and prints parseable ratios, and its trainers time what they claim
(the same initial weights, each trainer's own method, certified steps at the stated eps)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datkit.bench import ibp
from datkit.methods.certified import CROWNIBPTraining, IBPTraining
from helpers.runs import child_env, one_thread

RATIO = re.compile(r"^ratio (.+)/clean \(median\): (\d+\.\d+)\s+\(target <= 2\.5: (reached|NOT reached)\)$", re.M)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def test_ibp_cli_prints_parseable_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "datkit.bench", "ibp", "--iters", "2", "--warmup", "0", "--batch", "8",
                           "--threads", "1", "--json", str(out), "model.kwargs={width: 4, linear_size: 16}"],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr
    found = {m.group(1): (float(m.group(2)), m.group(3)) for m in RATIO.finditer(proc.stdout)}
    assert set(found) == {"ibp", "ibp (warm-up)", "crown-ibp (warm-up)"}, proc.stdout
    for ratio, verdict in found.values():
        assert ratio > 0 and (verdict == "reached") == (ratio <= 2.5)
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"clean", "ibp", "ibp (warm-up)", "crown-ibp (warm-up)"}
    assert all(len(r["times_s"]) == 2 for r in res["rows"].values())
    assert (res["rows"]["ibp"]["eps"] == pytest.approx(0.3)
            and res["rows"]["crown-ibp (warm-up)"]["eps"] == pytest.approx(0.15))
    assert abs(res["rows"]["ibp"]["ratio"] - found["ibp"][0]) < 1e-3
    assert res["setup"]["batch"] == 8 and res["setup"]["threads"] == 1


def test_trainers_share_the_initial_weights_and_run_their_methods() -> None:
    args = ibp.parse(["--batch", "4", "--device", "cpu", "model.kwargs={width: 4, linear_size: 16}"])
    first = ibp.build_trainer("ibp", args, None)
    init = {k: v.clone() for k, v in first.raw.state_dict().items()}
    others = {m: ibp.build_trainer(m, args, init) for m in ("clean", "crown-ibp")}
    assert isinstance(first.method, IBPTraining) and isinstance(others["crown-ibp"].method, CROWNIBPTraining)
    for t in others.values():
        for k, v in t.raw.state_dict().items():
            assert torch.equal(v, init[k]), k
    # the IBP initialization was applied (std sqrt(2 pi)/fan_in on the first convolution)
    conv = first.raw.net[0]
    assert conv.weight.std().item() == pytest.approx((2 * torch.pi) ** 0.5 / (conv.in_channels * 9), rel=0.3)
    for t in (first, *others.values()):
        t.backend.close()


def test_bad_arguments_exit_2(capsys) -> None:
    assert ibp.main(["--iters", "0"]) == 2
    assert "--iters" in capsys.readouterr().err
    assert ibp.main(["--model", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err
