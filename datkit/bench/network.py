"""``python -m datkit.bench network``: per-epoch C and T of each gradient compressor over emulated links.

For each number of hosts (``--hosts 2 4``) and link rate (``--rates 100mbit 1gbit 10gbit``) it creates the
emulated hosts (:mod:`datkit.netemu`: network namespaces on a switch, ``tc tbf`` on both ends of every
link), measures the link once with a TCP probe (host 1 -> host 0), then for each compressor
(``--compressors none fp16 int8 int8-2s onebit``, and ``onebit-adam``: 1-bit Adam, its momentum compressed from
the second epoch, the first being its warm-up) runs a short ``datkit.train`` job across the hosts with
the backend's own multi-node launch (``--backend torch`` by default; 1 worker per host), one run at a
time, and reads the run's ``results.json``. Per run it reports the median over the epochs after the
first (the first carries start-up: DDP's bucket rebuild, allocator warm-up) of

- ``C`` (s/epoch): rank 0's gradient communication time (the trainer's own definition: the union of the
  intervals during which gradient reduction was in flight, overlapping the backward pass);
- ``T`` (s/epoch): the epoch's training wall time;
- ``bytes/iter``: bytes one worker sent per optimizer step (datkit's byte model);
- ``C_wire`` (s/epoch): the time those bytes need at the probed link throughput, ``steps * bytes/iter * 8 /
  throughput`` (each worker's bytes leave through its own link), which shows how much of C is the wire
  and how much is encode/decode, message count and waiting on other workers;
- ``C_codec`` (s/epoch): ``steps`` times the least CPU time (``time.process_time``, of 20) of the compressor's own
  work in one exchange (encode, decode, error feedback, averaging) for this model's gradient with M = hosts workers,
  measured in this process on one thread with the network replaced by copies (``codec_seconds``); with C_wire it
  accounts for C, the rest being waiting for the other workers (skew on a shared CPU) and hand-offs;
- ``C min``: the smallest C of the counted epochs (the least disturbed by other processes on a shared
  machine), reported next to the median, never instead of it; ``C min ratio`` compares the minima.

Ratios are taken against ``none`` (the backend's own float32 allreduce) at the same hosts and rate:
absolute times are noisy on a small shared machine, the comparison within one bench run is not. Output:
``bench_network.md`` (table), ``bench_network.json`` and ``bench_network.png`` (C per compressor per rate,
log scale) in ``--out``. Needs root and iproute2 (exits 2 otherwise).

The table, the goals and the plot are :mod:`datkit.bench.network_report`'s. Goals
(:data:`datkit.bench.network_report.GOALS`, at 2 hosts x 100 Mbit/s) are printed under the table as reached /
not reached, next to this machine's plain PyTorch s/step (:func:`datkit.bench.step.plain_step_seconds`, measured
before the runs): the compressors' codec is CPU work, so a slower CPU reaches a higher C ratio on the same link.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datkit.netemu.hosts import NetemuError, Topology, rate_bits, require_tools
from datkit.netemu.launch import LAUNCHES
from datkit.netemu.probe import measure_throughput
from datkit.netemu.runner import Interrupted, hosts_up, launch_on_hosts

from .network_report import add_ratios, markdown, plot

# bench name -> (compression.name, compression options)
COMPRESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}), "fp16": ("fp16", {}), "bf16": ("bf16", {}), "int8": ("int8", {}),
    "int8-2s": ("int8", {"two_sided": True}), "onebit": ("onebit", {}),
    "onebit-adam": ("onebit", {}),  # 1-bit Adam: the optimizer's own exchange, the same codec (OPTIMIZER_VARIANTS)
}
# bench names that are an optimizer communicating itself (datkit.optim.communicating), not a gradient compressor: their
# overrides; the warm-up is the first epoch (optim.freeze_step = --steps), which the bench does not count anyway.
OPTIMIZER_VARIANTS: dict[str, list[str]] = {"onebit-adam": ["optim.name=onebit_adam"]}


def compression_overrides(comp: str, steps: int = 10) -> list[str]:
    """The datkit overrides of bench compressor ``comp``, e.g. int8-2s -> compression.name=int8 two_sided=true;
    onebit-adam -> optim.name=onebit_adam optim.freeze_step=<steps> (compressed from the second epoch on)."""
    if comp in OPTIMIZER_VARIANTS:
        return [*OPTIMIZER_VARIANTS[comp], f"optim.freeze_step={steps}"]
    name, opts = COMPRESSORS[comp]
    return [f"compression.name={name}", *(f"compression.{k}={str(v).lower()}" for k, v in opts.items())]
# The short job: cnn_small (0.84M parameters, 3.4 MB of float32 gradients per step) on the embedded MNIST.
JOB: list[str] = ["device=cpu", "data.name=mnist5k", "model.name=cnn_small", "method.name=pgd", "attack.steps=3",
                  "train.batch_size=64", "train.checkpoint_every=0", "eval.every=1000", "eval.num_samples=50",
                  "eval.final_num_samples=50", "eval.pgd_steps=1", "log.tensorboard=false", "log.plot=false",
                  "log.progress=false"]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options; extra ``key=value`` items are datkit config overrides of every run."""
    p = argparse.ArgumentParser(prog="python -m datkit.bench network", description="Per-epoch communication (C) "
                                "and training (T) time of each gradient compressor across emulated hosts and link "
                                "rates (network namespaces + tc tbf; needs root).")
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4], help="numbers of emulated hosts (default 2 4)")
    p.add_argument("--rates", nargs="+", default=["100mbit", "1gbit", "10gbit"], help="link rates (tc syntax)")
    p.add_argument("--compressors", nargs="+", default=["none", "fp16", "int8", "int8-2s", "onebit"],
                   help=f"compressors, from: {', '.join(COMPRESSORS)} "
                        "(default: none fp16 int8 int8-2s onebit; onebit-adam: 1-bit Adam)")
    p.add_argument("--backend", default="torch", choices=list(LAUNCHES), help="whose multi-node launch (default torch)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch (train.max_steps, default 10)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not counted (default 4)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is stopped (default 600)")
    p.add_argument("--prefix", default="dkb", help="namespace prefix (default dkb)")
    p.add_argument("--out", default="runs/bench_network", help="output folder (default runs/bench_network)")
    p.add_argument("--rerender", action="store_true", help="no runs: re-measure C_codec and rewrite the table, "
                   "JSON and PNG from --out's bench_network.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra datkit overrides for every run")
    args = p.parse_args(list(argv))
    bad = [c for c in args.compressors if c not in COMPRESSORS]
    if bad:
        p.error(f"--compressors: unknown {', '.join(bad)}; choose from {', '.join(COMPRESSORS)}")
    if "none" not in args.compressors:
        p.error("--compressors must include 'none' (the reference of every ratio)")
    if args.epochs < 2 or args.steps < 1 or min(args.hosts) < 2:
        p.error("--epochs >= 2 (the first is not counted), --steps >= 1, --hosts >= 2")
    return args


def epoch_stats(results: dict[str, Any]) -> dict[str, float]:
    """Median C, T and bytes/iter over the epochs after the first of a run's ``results.json``."""
    recs = results["epochs"][1:] or results["epochs"]
    return {"C_s": statistics.median(r["C_s"] for r in recs), "T_s": statistics.median(r["T_s"] for r in recs),
            "C_min_s": min(r["C_s"] for r in recs), "C_epochs_s": [r["C_s"] for r in results["epochs"]],
            "T_epochs_s": [r["T_s"] for r in results["epochs"]],
            "bytes_per_iter": statistics.median(r["bytes_per_iter"] for r in recs), "epochs_counted": len(recs),
            "world_size": results["final"]["world_size"]}


def one_run(topo: Topology, comp: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one compressor on the hosts that are up; its row (with ``error`` when the run failed)."""
    name = f"h{topo.hosts}_{topo.rate}_{comp}"
    run_dir, log_path = out / "runs" / name, out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    overrides = [*JOB, *compression_overrides(comp, args.steps), f"train.max_steps={args.steps}",
                 f"train.epochs={args.epochs}", f"train.output_dir={run_dir}", *args.overrides]
    start = time.monotonic()
    with open(log_path, "w") as log:
        rc = launch_on_hosts(topo, args.backend, overrides, timeout=args.timeout, log=log)
    row: dict[str, Any] = {"hosts": topo.hosts, "rate": topo.rate, "compressor": comp, "rc": rc,
                           "wall_s": time.monotonic() - start, "log": str(log_path)}
    res = run_dir / "results.json"
    if rc != 0 or not res.exists():
        row["error"] = f"exit {rc}; see {log_path}"
        return row
    row.update(epoch_stats(json.loads(res.read_text())))
    return row


class _Copies:
    """Collectives of ``world_size`` workers where every other worker sent the same data (no network)."""

    rank = 0

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_reduce(self, t: Any, op: str = "sum") -> Any:
        return t.mul_(self.world_size)

    def all_gather(self, t: Any) -> Any:
        import torch

        return torch.stack([t] * self.world_size)

    def all_to_all(self, t: Any) -> Any:
        return t.clone()


def model_numel(overrides: Sequence[str]) -> int:
    """Trainable parameters of the bench job's model (the gradient every step exchanges)."""
    import torch

    from datkit.config import load_config
    from datkit.data import DATASETS
    from datkit.engine import build_model

    cfg = load_config(None, [*JOB, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, DATASETS.get(cfg.data.name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def codec_seconds(comp: str, numel: int, world_size: int, iters: int = 20) -> float:
    """Least CPU seconds (over ``iters``; other processes only add to it) of one ``reduce_mean`` of compressor ``comp``
    on a ``numel`` gradient, one thread, the collectives replaced by copies: the compressor's CPU work per step, without
    the wire."""
    import torch

    from datkit.compress import get_compressor

    name, opts = COMPRESSORS[comp]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c, g, times = get_compressor(name, **opts), torch.randn(numel, generator=torch.Generator().manual_seed(0)), []
        for i in range(iters + 2):
            t0 = time.process_time()  # CPU time: not inflated when other processes take the core
            c.reduce_mean(g.clone(), _Copies(world_size), "bench")
            if i >= 2:
                times.append(time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return min(times)


def add_codec(rows: list[dict[str, Any]], steps: int, overrides: Sequence[str]) -> None:
    """``codec_s`` (per step) and ``C_codec_s`` (per epoch) of every row (in place)."""
    numel = model_numel(overrides)
    cache: dict[tuple[str, int], float] = {}
    for r in rows:
        key = (r["compressor"], r["hosts"])
        if COMPRESSORS[key[0]][0] == "none":  # the backend's own allreduce: no datkit codec work
            r["codec_s"] = r["C_codec_s"] = None
            continue
        if key not in cache:
            cache[key] = codec_seconds(key[0], numel, key[1])
        r["codec_s"], r["C_codec_s"] = cache[key], steps * cache[key]
    for r in rows:
        r["numel"] = numel


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid; write the table, JSON and PNG. Exit 2 without root/iproute2, 1 when a run failed."""
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.rerender:
        saved = json.loads((Path(args.out) / "bench_network.json").read_text())
        return write_outputs(Path(args.out).resolve(), **saved)
    try:
        require_tools()
        for r in args.rates:
            rate_bits(r)
    except NetemuError as e:
        print(f"datkit.bench network: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from datkit.bench.step import plain_step_seconds

    plain_step_s = plain_step_seconds()  # before any host is up: the machine's speed, for the goals' line
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    total = len(args.hosts) * len(args.rates) * len(args.compressors)
    bar = tqdm(total=total, desc="bench network", unit="run", file=sys.stderr)
    try:
        for h in args.hosts:
            for rate in sorted(args.rates, key=rate_bits):
                with hosts_up(Topology(h, rate, args.prefix)) as topo:
                    bps = measure_throughput(topo, nbytes=max(5_000_000, rate_bits(rate) // 8 // 10))
                    for comp in args.compressors:
                        row = one_run(topo, comp, args, out)
                        row["probe_bps"] = bps
                        rows.append(row)
                        bar.update()
                        msg = row.get("error") or (f"C {row['C_s']:.3f}s  T {row['T_s']:.3f}s  "
                                                   f"bytes/iter {row['bytes_per_iter']:,.0f}")
                        tqdm.write(f"{h} hosts, {rate} (probed {bps / 1e6:.0f} Mbit/s), {comp}: {msg}", file=sys.stderr)
    except Interrupted as e:
        print(f"datkit.bench network: {e}; hosts torn down; writing what was measured", file=sys.stderr)
    finally:
        bar.close()
    setup = {"backend": args.backend, "steps": args.steps, "epochs": args.epochs, "job": JOB + args.overrides,
             "overrides": args.overrides, "cpu_count": os.cpu_count(), "plain_step_s": plain_step_s}
    rc = write_outputs(out, setup, rows)
    return 1 if rc or len(rows) < total else 0


def write_outputs(out: Path, setup: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    """Add C_codec, C_wire and the ratios; write ``bench_network.{md,json,png}``; 1 if a run failed, else 0."""
    add_codec(rows, setup["steps"], setup.get("overrides", []))
    add_ratios(rows, setup["steps"])
    table = markdown(rows, setup)  # also marks the goal rows (goal_C_ratio, goal_reached)
    (out / "bench_network.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    (out / "bench_network.md").write_text(table)
    plot(rows, out / "bench_network.png")
    print(table)
    print(f"written: {out / 'bench_network.md'}, bench_network.json, bench_network.png")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
