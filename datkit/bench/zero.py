"""``python -m datkit.bench zero``: per-worker optimizer-state memory at ZeRO stages, vs stage 0.

Run with 2 or more workers (``torchrun --nproc_per_node 2 -m datkit.bench zero`` or the ``deepspeed``
launcher); needs DeepSpeed. For each stage it builds the model (default ``resnet50``: 25.6M
parameters), datkit's Adam as DeepSpeed's client optimizer, takes one training step on a small random
batch through the deepspeed backend, and sums the bytes of the optimizer's state tensors on this
worker (Adam's exp_avg and exp_avg_sq; ZeRO >= 1 keeps only this worker's partition of them). ZeRO's
promise (Rajbhandari et al. 2020): stage 1 and 2 hold 1/M of stage 0's optimizer state.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m datkit.bench zero", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="a datkit model name (default resnet50)")
    p.add_argument("--data", default="imagenet", help="data spec giving input shape and classes (default imagenet)")
    p.add_argument("--image-size", type=int, default=32,
                   help="side of the random input images (small: memory is the point)")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], help="ZeRO stages to measure")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (rank 0)")
    return p.parse_args(list(argv))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state on this worker."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def measure(stage: int, args: argparse.Namespace) -> dict[str, Any]:
    from datkit.backends import create_backend
    from datkit.config import load_config
    from datkit.data import DATASETS
    from datkit.models import create_model
    from datkit.optim import build_optimizer

    cfg = load_config(None, ["backend=deepspeed", f"deepspeed.zero_stage={stage}", f"model.name={args.model}",
                             "optim.name=adam"])
    be = create_backend(cfg)
    cfg.train.batch_size = 2 * be.world_size
    be.ds_config = {**be.ds_config, "train_batch_size": cfg.train.batch_size, "train_micro_batch_size_per_gpu": 2}
    spec = DATASETS.get(args.data)
    model = create_model(args.model, spec.num_classes, spec.in_channels, args.image_size, spec.mean, spec.std)
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(cfg.optim, model.parameters(), cfg.train.batch_size)
    engine, optimizer = be.setup(model, optimizer)
    x = torch.rand(2, spec.in_channels, args.image_size, args.image_size)
    y = torch.randint(0, spec.num_classes, (2,))
    be.backward(torch.nn.functional.cross_entropy(engine(x), y))
    be.step(optimizer)
    out = {"stage": stage, "params": params, "world_size": be.world_size,
           "optimizer_state_bytes": state_bytes(optimizer)}
    del engine, optimizer, model
    be.engine = None
    gc.collect()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("datkit.bench zero: error: needs DeepSpeed (pip install -e '.[deepspeed]')", file=sys.stderr)
        return 2
    rows = [measure(s, args) for s in args.stages]
    import deepspeed.comm as ds_comm

    if ds_comm.get_rank() == 0:
        base = next((r["optimizer_state_bytes"] for r in rows if r["stage"] == 0), None)
        print(f"{args.model}: {rows[0]['params']:,} parameters, {rows[0]['world_size']} workers, "
              "Adam (client optimizer)\n")
        print("| ZeRO stage | optimizer state per worker (MB) | vs stage 0 |\n|---|---|---|")
        for r in rows:
            r["ratio_vs_stage0"] = None if not base else r["optimizer_state_bytes"] / base
            ratio = "-" if r["ratio_vs_stage0"] is None else f"{r['ratio_vs_stage0']:.3f}"
            print(f"| {r['stage']} | {r['optimizer_state_bytes'] / 2**20:.1f} | {ratio} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    if rows[0]["world_size"] < 2 and ds_comm.get_rank() == 0:
        print("note: 1 worker -- ZeRO has nothing to partition; run with 2 or more workers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
