"""Run under ``torchrun --nproc_per_node M`` (gloo, CPU): checks of datkit.compress on M real workers.

Rank 0 writes a JSON file (path in argv[1]) with one entry per check: measured quantities that
``tests/test_compress_dist.py`` asserts on. Every worker holds different data (seeded by rank).
The backend is ``$DATKIT_TEST_BACKEND`` (default ``torch``; ``tests/test_horovod.py`` runs the same
checks with ``horovod`` under ``horovodrun``).
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

from datkit.backends import create_backend
from datkit.compress import ByteCounter, CountingCollectives, allreduce_bytes, gather_state, get_compressor, pick_state
from datkit.config import load_config

N = 10_000 + 37  # not a multiple of any block or world size: padding is exercised


def exact_mean(be, g: torch.Tensor) -> torch.Tensor:
    """Sum of every worker's tensor in rank order, divided by M (the reference)."""
    rows = be.all_gather(g)
    acc = rows[0].clone()
    for i in range(1, be.world_size):
        acc += rows[i]
    return acc / be.world_size


def block_scales(x: torch.Tensor, m: int, block: int) -> torch.Tensor:
    """Per-element int8 scale (max |x| of its block / 127) with the exchange's padding."""
    n = x.numel()
    chunk = math.ceil(n / (m * block)) * block
    padded = torch.zeros(m * chunk)
    padded[:n] = x
    s = padded.view(-1, block).abs().amax(dim=1, keepdim=True) / 127.0
    return s.expand(-1, block).reshape(-1)[:n]


def written_bytes() -> int:
    """Bytes this process wrote through write/writev/send so far (``/proc/self/io``'s wchar): its socket sends."""
    from datkit.bench.comm import written_bytes as wchar

    return wchar()


def main(out_path: str) -> None:
    cfg = load_config(None, [f"backend={os.environ.get('DATKIT_TEST_BACKEND', 'torch')}", "device=cpu"])
    be = create_backend(cfg)
    m, rank = be.world_size, be.rank
    torch.manual_seed(100 + rank)
    g = torch.randn(N) * (1 + rank)  # different scales per worker
    g[:50] *= 1e-3  # some small values
    mean = exact_mean(be, g)
    res: dict = {"world_size": m}

    # none: bit-for-bit the exact mean
    out = get_compressor("none").reduce_mean(g.clone(), be)
    res["none_equal"] = bool(torch.equal(out, mean))

    # fp16 / bf16: under u * mean|g_i| + u * |mean| * (1 + u) (+ fp16's subnormal spacing)
    absmean = exact_mean(be, g.abs())
    for name, u, tiny in (("fp16", 2.0 ** -11, 2.0 ** -24), ("bf16", 2.0 ** -8, 0.0)):
        out = get_compressor(name).reduce_mean(g.clone(), be)
        bound = u * absmean + u * mean.abs() * (1 + u) + tiny + 1e-7 * absmean
        res[f"{name}_bound_ratio"] = float(((out - mean).abs() / bound).max())
        res[f"{name}_max_err"] = float((out - mean).abs().max())

    # int8 nearest, one-sided: |err| <= mean_i s_i / 2; two-sided: + s_server / 2; and two = Q(one) exactly
    block = 256
    s_mean = exact_mean(be, block_scales(g, m, block))
    one = get_compressor("int8", block_size=block).reduce_mean(g.clone(), be)
    two = get_compressor("int8", block_size=block, two_sided=True).reduce_mean(g.clone(), be)
    res["int8_one_bound_ratio"] = float(((one - mean).abs() / (s_mean / 2 * (1 + 1e-5) + 1e-7)).max())
    s_server = block_scales(one, m, block)
    res["int8_two_bound_ratio"] = float(((two - mean).abs() / ((s_mean + s_server) / 2 * (1 + 1e-5) + 1e-7)).max())
    q = get_compressor("int8", block_size=block)
    chunk = math.ceil(N / (m * block)) * block
    padded = torch.zeros(1, m * chunk)
    padded[0, :N] = one
    requant = q.decompress(q.compress(padded))[0, :N]
    res["two_equals_server_quantized_one"] = bool(torch.equal(two, requant))
    res["two_differs_from_one"] = bool(not torch.equal(two, one))

    # stochastic int8: unbiased -- the error of the average over many draws shrinks like 1/sqrt(draws)
    sto = get_compressor("int8", block_size=block, rounding="stochastic", seed=3)
    draws = 200
    acc = torch.zeros(N, dtype=torch.float64)
    single = None
    for _ in range(draws):
        out = sto.reduce_mean(g.clone(), be)
        single = (out - mean).abs().mean().item() if single is None else single
        acc += out.double()
    res["stochastic_single_err"] = single
    res["stochastic_avg_err"] = float((acc / draws - mean.double()).abs().mean())
    near_err = float((one - mean).abs().mean())
    res["nearest_err"] = near_err

    # bytes per iteration vs a float32 ring allreduce of the same tensor (scales included)
    big = torch.randn(1 << 20)
    fp32 = allreduce_bytes(big.numel() * 4, m)
    # ... and against this worker's own socket writes (wchar: other processes cannot disturb it)
    for label, name, opts in (("none", "none", {}), ("fp16", "fp16", {}), ("bf16", "bf16", {}),
                              ("int8_one", "int8", {}), ("int8_two", "int8", {"two_sided": True}),
                              ("onebit", "onebit", {})):
        counter = ByteCounter()
        be.barrier()
        before = written_bytes()
        get_compressor(name, **opts).reduce_mean(big.clone(), CountingCollectives(be, counter))
        written = written_bytes() - before
        counted = counter.reset()
        res[f"bytes_ratio_{label}"] = counted / fp32
        res[f"written_ratio_{label}"] = written / counted

    # the backend's plain float32 all_reduce (DDP's and Horovod's gradient path): ring model vs socket writes
    be.barrier()
    before = written_bytes()
    be.all_reduce(big.clone())
    res["written_ratio_allreduce"] = (written_bytes() - before) / fp32

    # onebit error feedback: the residuals carry what was dropped; gather/pick round-trips them
    ob = get_compressor("onebit", block_size=64)
    total = torch.zeros(N)
    steps = 30
    for _ in range(steps):
        total += ob.reduce_mean(g.clone(), be)
    # with feedback, the running sum of outputs tracks steps * mean (error stays bounded, not growing)
    res["onebit_ef_drift"] = float((total / steps - mean).abs().mean() / mean.abs().mean())
    nofb = get_compressor("onebit", block_size=64, error_feedback=False)
    total = torch.zeros(N)
    for _ in range(steps):
        total += nofb.reduce_mean(g.clone(), be)
    res["onebit_noef_drift"] = float((total / steps - mean).abs().mean() / mean.abs().mean())
    saved = gather_state(ob.local_state(), be)
    mine = pick_state(saved, rank, m, torch.device("cpu"))
    key = sorted(ob.residuals["worker"])[0]
    # by value, every side and bucket: what rank 0 saved and this rank picks back is this rank's own residuals
    res["state_roundtrip"] = bool(all(sorted(mine[side]) == sorted(ob.residuals[side]) and ob.residuals[side]
                                      and all(torch.equal(mine[side][k], r) for k, r in ob.residuals[side].items())
                                      for side in ("worker", "server")))
    res["state_differs_per_rank"] = bool(not torch.equal(saved["ranks"][0]["worker"][key],
                                                         saved["ranks"][m - 1]["worker"][key]))

    # one worker's view of another's output: every worker gets the same result
    outs = be.all_gather(get_compressor("onebit").reduce_mean(g.clone(), be))
    res["same_on_all_workers"] = bool(all(torch.equal(outs[0], outs[i]) for i in range(m)))

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    be.close()


if __name__ == "__main__":
    main(sys.argv[1])
