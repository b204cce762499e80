"""Packaging: every package is listed in pyproject.toml, ``backends/`` installs as ``datkit.backends`` only,
and ``datkit/train.py`` runs as a script with the ``--local_rank`` argument launchers append."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import tomllib

from helpers.runs import REPO, TINY, describe, load_checkpoint, run_python


@pytest.fixture(scope="module")
def setuptools_cfg() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> list[str]:
    found = []
    for top, dotted in (("datkit", "datkit"), ("backends", "datkit.backends")):
        for init in sorted((REPO / top).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO / top)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            found.append(".".join([dotted, *rel.parts]))
    return found


def test_every_package_is_listed(setuptools_cfg: dict) -> None:
    on_disk = _packages_on_disk()
    assert "datkit" in on_disk and "datkit.backends" in on_disk
    listed = set(setuptools_cfg["packages"])
    missing = [p for p in on_disk if p not in listed]
    assert not missing, f"packages missing from [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - set(on_disk))
    assert not stale, f"pyproject.toml lists packages that do not exist: {stale}"


def test_backends_folder_maps_to_datkit_backends(setuptools_cfg: dict) -> None:
    package_dir = setuptools_cfg["package-dir"]
    assert package_dir.get("datkit.backends") == "backends"
    assert "backends" not in setuptools_cfg["packages"], "a top-level package named 'backends' would be installed"
    assert all(p == "datkit" or p.startswith("datkit.") for p in setuptools_cfg["packages"])


@pytest.mark.parametrize("package", _packages_on_disk())
def test_package_imports_from_this_checkout(package: str) -> None:
    mod = importlib.import_module(package)
    path = Path(mod.__file__).resolve()
    assert REPO in path.parents, f"{package} imported from {path}, not from {REPO}"


def test_datkit_backends_is_the_backends_folder() -> None:
    import datkit.backends

    assert Path(datkit.backends.__file__).resolve() == REPO / "backends" / "__init__.py"
    assert {"torch", "horovod", "deepspeed"} <= set(datkit.backends.BACKENDS.names())


def test_no_top_level_backends_module(tmp_path: Path) -> None:
    proc = run_python(["-c", "import backends; print(backends.__file__)"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0, f"a top-level 'backends' module is importable from {proc.stdout.strip()}"
    assert "ModuleNotFoundError" in proc.stderr, describe(proc)


def test_datkit_never_imports_horovod_or_deepspeed_at_import_time(tmp_path: Path) -> None:
    code = ("import sys, datkit, datkit.train, datkit.engine, datkit.backends; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('horovod', 'deepspeed')); "
            "assert not bad, bad")
    proc = run_python(["-c", code], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, describe(proc)


# --- the script form (what the deepspeed launcher runs) ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("local_rank", [["--local_rank=0"], ["--local-rank", "0"]],
                         ids=["local_rank=0", "local-rank_0"])
def test_train_script_with_local_rank(local_rank: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_python([str(REPO / "datkit" / "train.py"), *local_rank, *TINY, "train.epochs=1", "train.max_steps=1",
                       f"train.output_dir={out}"], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, describe(proc)
    assert "world_size=1" in proc.stdout, describe(proc)
    assert (out / "results.json").exists() and load_checkpoint(out)["epoch"] == 1


@pytest.mark.slow
def test_train_script_local_rank_with_auto_backend_means_deepspeed(tmp_path: Path) -> None:
    # backend=auto + --local_rank without torchrun = the deepspeed launcher: the DeepSpeed backend runs when
    # DeepSpeed is installed (the dev set-up installs it), else a clear error that names the way out
    out = tmp_path / "out"
    args = [a for a in TINY if not a.startswith("backend=")]
    proc = run_python([str(REPO / "datkit" / "train.py"), "--local_rank=0", *args, "backend=auto", "train.epochs=1",
                       "train.max_steps=1", f"train.output_dir={out}"], cwd=tmp_path, timeout=240)
    if importlib.util.find_spec("deepspeed") is not None:
        assert proc.returncode == 0, describe(proc)
        assert "backend=deepspeed" in proc.stdout, describe(proc)
        assert (out / "results.json").exists()
    else:
        assert proc.returncode == 2, describe(proc)
        assert "deepspeed" in proc.stderr and "backend=torch" in proc.stderr, describe(proc)
        assert not out.exists()
