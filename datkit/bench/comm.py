"""``python -m datkit.bench comm``: what each gradient compressor costs and saves, on real workers.

Run under ``torchrun --nproc_per_node 2`` (or more; gloo on CPU, NCCL on GPU). For a flat gradient of
``--numel`` float32 elements (default 25,557,032: ResNet-50) that differs per worker, and for each
compressor of ``datkit.compress``, it reports

- bytes per iteration one worker sends, relative to a float32 ring allreduce of the same tensor
  (counted from every collective's payload, scales included);
- the loopback check: the bytes the ``lo`` interface carried (``/proc/net/dev``) per worker and
  iteration, relative to the counted bytes (the byte model matches the wire when this is ~1; other
  processes' loopback traffic inflates it), and rank 0's own socket writes (``/proc/self/io``'s
  ``wchar``) relative to its counted bytes, which other processes cannot disturb;
- the time of one compressed reduce relative to one plain float32 ``all_reduce``, the two alternated in
  the same run (median over ``--iters``);
- the relative error ``||out - mean|| / ||mean||`` of the reduced gradient against the exact mean.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

RESNET50_NUMEL = 25_557_032
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "none (fp32 PS)": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "int8 one-sided": ("int8", {}),
    "int8 two-sided": ("int8", {"two_sided": True}),
    "int8 two-sided stochastic": ("int8", {"two_sided": True, "rounding": "stochastic"}),
    "onebit (EF)": ("onebit", {}),
}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m datkit.bench comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=RESNET50_NUMEL, help="gradient size in elements (default: ResNet-50)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per compressor")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per compressor")
    p.add_argument("--only", nargs="*", default=None, help=f"variants to run (default all): {', '.join(VARIANTS)}")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (rank 0)")
    return p.parse_args(list(argv))


def loopback_bytes() -> int | None:
    """Bytes transmitted by the loopback interface so far (None where /proc/net/dev has no ``lo``)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])  # receive: 8 fields, then transmit bytes
    except OSError:
        return None
    return None


def written_bytes() -> int | None:
    """Bytes this process has written through system calls (``wchar`` of ``/proc/self/io``): its socket sends.

    Unlike the loopback counters it ignores other processes' traffic, so it stays meaningful on a busy host.
    """
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(be, g: torch.Tensor, mean: torch.Tensor, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant: counted and loopback bytes, time ratio against a plain all_reduce, relative error."""
    from datkit.compress import ByteCounter, CountingCollectives, allreduce_bytes, get_compressor

    name, opts = VARIANTS[label]
    comp, counter = get_compressor(name, **opts), ByteCounter()
    coll = CountingCollectives(be, counter)
    out = None
    for _ in range(args.warmup):
        out = comp.reduce_mean(g.clone(), coll)
    counter.reset()
    be.barrier()
    lo0, w0 = loopback_bytes(), written_bytes()
    for _ in range(args.iters):
        out = comp.reduce_mean(g.clone(), coll)
    w1 = written_bytes()
    be.barrier()
    lo1 = loopback_bytes()
    sent = None if w0 is None or w1 is None else float(w1 - w0) / args.iters
    counted = counter.reset() / args.iters
    t_comp, t_plain = [], []
    for _ in range(args.iters):
        be.barrier()
        t_plain.append(_timed(lambda: be.all_reduce(g.clone())))
        be.barrier()
        t_comp.append(_timed(lambda: comp.reduce_mean(g.clone(), coll)))
    m = be.world_size
    wire = None if lo0 is None or lo1 is None else (lo1 - lo0) / args.iters / m
    err = float((out.double() - mean).norm() / mean.norm())
    return {"variant": label, "bytes_per_iter": counted,
            "bytes_ratio": counted / allreduce_bytes(g.numel() * 4, m),
            "loopback_ratio": None if wire is None else wire / counted,
            "written_ratio": None if sent is None else sent / counted,
            "time_ratio": statistics.median(t_comp) / statistics.median(t_plain),
            "t_compressed_s": statistics.median(t_comp), "t_allreduce_s": statistics.median(t_plain), "rel_error": err}


def report(rows: list[dict[str, Any]], numel: int, m: int, device: str) -> str:
    lines = [f"gradient of {numel:,} float32 elements, {m} workers, {device}; ratios against a float32 ring allreduce",
             "", "| compressor | bytes/iter (per worker) | bytes vs fp32 | loopback / counted | written / counted "
             "| time vs fp32 allreduce | relative error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo = "-" if r["loopback_ratio"] is None else f"{r['loopback_ratio']:.3f}"
        wr = "-" if r["written_ratio"] is None else f"{r['written_ratio']:.3f}"
        lines.append(f"| {r['variant']} | {r['bytes_per_iter']:,.0f} | {r['bytes_ratio']:.4f} | {lo} | {wr} | "
                     f"{r['time_ratio']:.2f} | {r['rel_error']:.2e} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on a bad setting or a single process)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    only = args.only or list(VARIANTS)
    bad = [v for v in only if v not in VARIANTS]
    if bad or args.numel < 1 or args.iters < 1 or args.warmup < 0:
        print(f"datkit.bench comm: error: unknown variant(s) {bad} (known: {', '.join(VARIANTS)})" if bad else
              "datkit.bench comm: error: --numel and --iters must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    from datkit.backends import create_backend
    from datkit.config import load_config

    be = create_backend(load_config(None, ["backend=torch"]))
    try:
        if be.world_size < 2:
            print("datkit.bench comm: error: needs 2 or more workers, e.g. "
                  "torchrun --standalone --nproc_per_node 2 -m datkit.bench comm", file=sys.stderr)
            return 2
        torch.manual_seed(1234 + be.rank)
        g = torch.randn(args.numel, device=be.device) * (1.0 + be.rank)
        mean = be.all_gather(g).double().sum(dim=0) / be.world_size
        rows = []
        for label in only:
            rows.append(measure(be, g, mean, label, args))
            if be.is_main:
                print(f"  {label}: done", file=sys.stderr, flush=True)
        if be.is_main:
            print(report(rows, args.numel, be.world_size, str(be.device)), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"numel": args.numel, "world_size": be.world_size, "rows": rows}, f, indent=2)
        return 0
    finally:
        be.close()


if __name__ == "__main__":
    sys.exit(main())
