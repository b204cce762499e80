"""Tests of ``python -m datkit.bench``: the CLI runs and prints a parseable ratio, and the plain
PyTorch loop it compares against does exactly the work of datkit's training step."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datkit.bench import __main__ as bench_main
from datkit.bench import step
from helpers.runs import one_thread

# One intra-op thread for the bench subprocess: on a shared CI machine, oversubscribed OpenMP threads are ~10x slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
RATIO = re.compile(r"^ratio datkit/plain \(median\): (\d+\.\d+)\s+\(target <= 1\.05: (reached|NOT reached)\)$", re.M)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared CI machine, oversubscribed OpenMP threads are ~10x slower."""
    with one_thread():
        yield


def test_step_cli_prints_parseable_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "datkit.bench", "step", "--iters", "3", "--warmup", "1",
                           "--batch", "16", "--steps", "2", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    m = RATIO.search(proc.stdout)
    assert m, proc.stdout
    ratio = float(m.group(1))
    assert ratio > 0
    assert (m.group(2) == "reached") == (ratio <= 1.05)
    assert "| datkit |" in proc.stdout and "| plain PyTorch |" in proc.stdout
    res = json.loads(out.read_text())
    assert abs(res["ratio"] - ratio) < 1e-3
    assert len(res["datkit"]["times_s"]) == len(res["plain"]["times_s"]) == 3
    assert res["setup"]["batch"] == 16 and res["setup"]["pgd_steps"] == 2 and res["setup"]["threads"] == 1


def test_dispatch_help_and_unknown_subcommand(capsys) -> None:
    assert bench_main.main(["--help"]) == 0
    assert "step" in capsys.readouterr().out
    assert bench_main.main(["nope"]) == 2
    assert "unknown subcommand 'nope'" in capsys.readouterr().err


def test_step_rejects_what_the_plain_loop_cannot_do(capsys) -> None:
    assert step.main(["method.name=fgsm"]) == 2
    assert "PGD-AT only" in capsys.readouterr().err


def test_plain_loop_does_the_same_work_as_datkit() -> None:
    """Same seed, same batch: identical adversarial examples and identical weights after one step."""
    d = step.build_datkit(step.parse(["--batch", "8", "--steps", "3", "--device", "cpu", "method.lam=0.5"]))
    plain, plain_opt = step.build_plain(d)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    a = d["cfg"].attack
    alpha = 2.5 * a.eps / a.steps
    torch.manual_seed(5)
    adv_datkit = d["method"].training_attack(a.eps)(d["raw"], x, y)
    torch.manual_seed(5)
    adv_plain = step.plain_pgd(plain, x, y, a.eps, alpha, a.steps)
    assert torch.equal(adv_datkit, adv_plain)
    torch.manual_seed(7)
    step.datkit_step(d, x, y)
    torch.manual_seed(7)
    step.plain_step(plain, plain_opt, x, y, a.eps, alpha, a.steps, lam=d["cfg"].method.lam)
    for p_datkit, p_plain in zip(d["raw"].parameters(), plain.parameters()):
        torch.testing.assert_close(p_datkit, p_plain, rtol=0, atol=1e-6)
    d["backend"].close()
