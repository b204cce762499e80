"""datkit's parts in a user's own DDP loop: ``datkit.compress.register_ddp_hook`` and ``examples/own_loop_ddp.py``.

- ``register_ddp_hook`` refuses what it cannot use (an unknown compressor name, listing the known ones; a model
  that is not DDP; options for ``none``) and works on a one-process group (nothing is sent); the compress
  package does not import ``datkit.backends`` (the hook core lives there, the backend builds on it);
- one torchrun launch of the example (2 workers, gloo, a few steps): exit 0, a finite loss, the bytes per
  iteration the hook measured equal those of datkit's accounting for int8 two-sided on the example's model
  (computed here from the payload: int8 codes + one float32 scale per 256-element block, padded to M blocks,
  an all_to_all and an all_gather), and the same weights on both ranks.
"""
from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from datkit.compress import COMPRESSORS, DDPCompressionHook, allreduce_bytes, register_ddp_hook
from helpers.ports import reserve_port
from helpers.runs import REPO, describe, run_python

# --- register_ddp_hook in one process ---------------------------------------------------------------

@pytest.fixture
def one_process_ddp(tmp_path: Path) -> Iterator[nn.parallel.DistributedDataParallel]:
    """A DDP model on a one-process gloo group (torn down afterwards: the pytest process keeps no group)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        yield nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    finally:
        dist.destroy_process_group()


def test_unknown_compressor_name_is_a_value_error_listing_the_known_ones(one_process_ddp) -> None:
    with pytest.raises(ValueError) as err:
        register_ddp_hook(one_process_ddp, "int4")
    msg = str(err.value)
    assert "int4" in msg
    for name in COMPRESSORS.names():
        assert name in msg, f"{name!r} missing from: {msg}"


def test_a_model_that_is_not_ddp_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_ddp_hook(nn.Linear(3, 2), "int8", two_sided=True)


@pytest.mark.parametrize("name, options, words", [("none", {"two_sided": True}, ["two_sided", "none"]),
                                                  ("fp16", {"two_sided": True}, ["two_sided", "fp16"])])
def test_options_that_do_not_apply_are_refused(one_process_ddp, name: str, options: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        register_ddp_hook(one_process_ddp, name, **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_one_process_hook_reduces_nothing_and_closes(one_process_ddp) -> None:
    hook = register_ddp_hook(one_process_ddp, "int8", two_sided=True)
    assert isinstance(hook, DDPCompressionHook)
    x = torch.randn(5, 6)
    one_process_ddp(x).sum().backward()  # one worker: the mean is the gradient itself, nothing sent
    ref = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    ref.load_state_dict(one_process_ddp.module.state_dict())
    ref(x).sum().backward()
    for p, q in zip(one_process_ddp.module.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert hook.bytes_sent() == 0.0
    assert hook.state_dict() == {"world_size": 1, "ranks": [{"worker": {}, "server": {}, "generator": None}]}
    hook.close()
    hook.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        one_process_ddp(x).sum().backward()


def test_compress_package_does_not_import_backends() -> None:
    for path in sorted((REPO / "datkit" / "compress").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any("backends" in n.split(".") for n in names), f"{path.name} imports {names}"


# --- the example under torchrun ----------------------------------------------------------------------

def _int8_two_sided_bytes(n: int, m: int, block: int = 256) -> float:
    """Bytes one worker sends per bucket of ``n`` float32 gradients: the bucket padded to M chunks of whole
    blocks; each chunk travels as 1-byte codes + a 4-byte scale per block, to the M-1 other workers in the
    all_to_all, and the re-quantized average of the own chunk to the M-1 others in the all_gather."""
    chunk = math.ceil(n / (m * block)) * block
    payload = chunk + 4 * (chunk // block)
    return 2 * (m - 1) * payload


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_own_loop_example_under_torchrun(tmp_path: Path) -> None:
    steps, m = 3, 2
    proc = run_python(["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={m}", "--master_addr=127.0.0.1",
                       f"--master_port={reserve_port()}", str(REPO / "examples" / "own_loop_ddp.py"),
                       "--steps", str(steps), "--save-weights", str(tmp_path / "w")], cwd=tmp_path, timeout=280)
    assert proc.returncode == 0, describe(proc)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, describe(proc)  # rank 0 alone prints
    res = json.loads(lines[0])
    assert res["world_size"] == m and res["steps"] == steps
    assert math.isfinite(res["final_loss"]) and res["final_loss"] > 0, res

    # the expectation, from the example's model (one DDP bucket: under DDP's 1 MiB first bucket and 25 MB cap)
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_loop_ddp", REPO / "examples" / "own_loop_ddp.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    n = sum(p.numel() for p in example.make_model().parameters())
    assert 4 * n < 1024 * 1024
    assert res["bytes_per_iter"] == _int8_two_sided_bytes(n, m), res
    assert res["fp32_allreduce_bytes_per_iter"] == allreduce_bytes(4 * n, m) == 4 * n, res
    assert 0.2 < res["bytes_per_iter"] / res["fp32_allreduce_bytes_per_iter"] < 0.35, res

    # the decoded average is the same on every worker, so the weights are too, bit for bit
    w = [torch.load(tmp_path / f"w.rank{r}.pt", weights_only=True) for r in range(m)]
    assert sorted(w[0]) == sorted(w[1])
    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]), f"{k} differs between rank 0 and rank 1"
