"""``python -m datkit.bench comm`` under torchrun: every compressor's row, byte ratios within the
targets, and the counted bytes agree with what the worker wrote to its sockets (within 10%) and with
what the loopback interface carried."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from datkit.bench.comm import VARIANTS, loopback_bytes
from helpers.runs import describe, run_python

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LIMITS = {"none (fp32 PS)": 1.0, "fp16": 0.51, "bf16": 0.51, "int8 one-sided": 0.64, "int8 two-sided": 0.27,
          "int8 two-sided stochastic": 0.27, "onebit (EF)": 0.04}


def test_every_variant_has_a_target() -> None:
    assert sorted(LIMITS) == sorted(VARIANTS)


@pytest.mark.skipif(loopback_bytes() is None, reason="needs Linux's /proc/net/dev with a loopback interface")
def test_bench_comm_reports_bytes_matching_the_wire(tmp_path: Path) -> None:
    out = tmp_path / "comm.json"
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.bench",
                       "comm", "--numel", "2000000", "--iters", "2", "--json", str(out)], cwd=tmp_path, timeout=280)
    assert proc.returncode == 0, describe(proc)
    assert "| compressor | bytes/iter" in proc.stdout
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == sorted(VARIANTS)
    for name, r in rows.items():
        assert r["bytes_ratio"] <= LIMITS[name] + 1e-4, (name, r["bytes_ratio"])
        # our own socket writes match the count; the loopback interface carried at least that much (other
        # processes on the host can only add to it, so its upper side is not asserted)
        assert 0.9 <= r["written_ratio"] <= 1.1, (name, r["written_ratio"])
        assert r["loopback_ratio"] >= 0.9, (name, r["loopback_ratio"])
        assert r["time_ratio"] > 0
    assert rows["none (fp32 PS)"]["rel_error"] < 1e-6
    assert rows["fp16"]["rel_error"] < rows["int8 one-sided"]["rel_error"] < rows["onebit (EF)"]["rel_error"]


def test_bench_comm_refuses_a_single_process(tmp_path: Path) -> None:
    proc = run_python(["-m", "datkit.bench", "comm", "--numel", "1000"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "2 or more workers" in proc.stderr, describe(proc)


def test_bench_comm_refuses_unknown_variants(tmp_path: Path) -> None:
    proc = run_python(["-m", "datkit.bench", "comm", "--only", "int4"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "unknown variant" in proc.stderr, describe(proc)
