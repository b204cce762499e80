"""Fixtures shared by several test modules: pytest hands them to every test module here, without an import."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.runs import REPO, TINY, describe, run_python

WIRE = REPO / "tests" / "helpers" / "wire_train.py"


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith("backend=")]


# --- test_onebit_optim, test_horovod, test_deepspeed ------------------------------------------------------
@pytest.fixture(scope="module")
def torch_onebit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every torch-backend run of test_onebit_optim in ONE 2-worker torchrun launch, with the certified runs that
    test_horovod and test_deepspeed compare with (``test_certified_attacked.CROSS_BACKEND``); returns the folder
    of their outputs. Module scope: one launch for each module that asks for it."""
    from test_certified_attacked import CROSS_BACKEND
    from test_onebit_optim import ONEBIT

    tmp = tmp_path_factory.mktemp("onebit")
    base = ["backend=torch", *_tiny(), *ONEBIT]
    runs = {"ddp": base, "noddp": [*base, "dist.ddp=false"],
            "adam_warm": [*base, "optim.name=adam", "train.epochs=1", "train.max_steps=2"],
            "onebit_warm": [*base, "train.epochs=1", "train.max_steps=2"],
            "part": [*base, "train.epochs=1"], "resumed": [*base, "train.resume=true"],
            "lamb": [*base, "optim.name=onebit_lamb"]}
    runs.update({name: ["backend=torch", *_tiny(), *args] for name, args in CROSS_BACKEND.items()})
    runs = {name: [*args, f"train.output_dir={tmp / ('part' if name == 'resumed' else name)}"]
            for name, args in runs.items()}
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WIRE),
                       json.dumps(runs)], cwd=tmp, timeout=300, DATKIT_TEST_WIRE_DIR=str(tmp))
    assert proc.returncode == 0, describe(proc)
    return tmp
