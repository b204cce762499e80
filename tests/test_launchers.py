"""The launcher scripts: quickstart passes its arguments on as config overrides (not as pip extras),
and every shell script in launchers/ is valid bash."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers.runs import REPO, TINY, child_env, describe

SCRIPTS = sorted((REPO / "launchers").glob("*.sh")) + sorted((REPO / "launchers").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launcher_is_valid_bash(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(),
                    reason="needs the repo's .venv, which `bash tests/run.sh` creates")
def test_quickstart_passes_overrides_to_the_main_job(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    args = [a for a in TINY if not a.startswith("backend=")] + ["train.epochs=1", "train.max_steps=2",
                                                                f"train.output_dir={out}"]
    proc = subprocess.run(["bash", str(REPO / "launchers" / "quickstart.sh"), *args], capture_output=True, text=True,
                          timeout=600, env=child_env())
    assert proc.returncode == 0, describe(proc)
    res = json.loads((out / "results.json").read_text())
    assert res["final"]["world_size"] == 2 and res["config"]["train"]["max_steps"] == 2
