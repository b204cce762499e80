"""``python -m datkit.bench step``: one PGD-AT training step of datkit vs a hand-written PyTorch loop.

The datkit side goes through the real code path of a training step: config from
``load_config(None, overrides)``, backend from ``create_backend``, the run (model, method, optimizer,
scheduler, the backend's ``setup``) from ``build_run`` -- the builder of every training run -- then per step
``StepInfo(eps)`` and ``Trainer.train_step`` itself (``method.loss``, ``backend.backward``, ``backend.step``,
``scheduler.step``). The plain side is a
self-contained PGD (sign gradient, projection, clamp to [0, 1]) and training step on a deep copy of
the same model with the same optimizer settings. Both see the same batches; their iterations
alternate (datkit first on even rounds, plain first on odd ones) so that machine noise and
ordering effects hit both alike. The ratio is median(datkit) / median(plain); the target is <= 1.05.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datkit.backends import create_backend
from datkit.config import load_config
from datkit.data import DATASETS, build_data
from datkit.engine import Trainer, build_model
from datkit.methods import StepInfo
from datkit.optim import eps_at
from datkit.preflight import validate_config

from .assemble import bench_run

TARGET = 1.05


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options of ``step``; extra ``key=value`` items are datkit config overrides."""
    p = argparse.ArgumentParser(prog="python -m datkit.bench step", description="Time one PGD-AT training step of "
                                "datkit against a hand-written PyTorch loop, alternating the two in one process.")
    p.add_argument("--model", default="cnn_small", help="datkit model name (default cnn_small)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--steps", type=int, default=7, help="PGD steps per training step (default 7)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations of each side (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations of each side first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="datkit device (default auto)")
    p.add_argument("--data", default="random", choices=("random", "mnist5k"),
                   help="random [0,1] tensors (default) or mnist5k")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra datkit config overrides")
    return p.parse_args(list(argv))


def build_datkit(args: argparse.Namespace) -> dict[str, Any]:
    """Config, backend and the run (model, optimizer, scheduler, method), built as every training run is."""
    cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}", f"attack.steps={args.steps}",
                             "backend=torch", f"device={args.device}", "data.name=mnist5k",
                             f"train.threads={args.threads or torch.get_num_threads()}", *args.overrides])
    validate_config(cfg)
    a, t = cfg.attack, cfg.train
    if (cfg.method.name != "pgd" or a.norm != "linf" or not a.random_start or t.grad_accum != 1 or t.grad_clip > 0
            or cfg.data.augment_shift):
        raise ValueError("bench step compares PGD-AT only: method.name=pgd, attack.norm=linf, "
                         "attack.random_start=true, train.grad_accum=1, train.grad_clip=0, data.augment_shift=0")
    backend = create_backend(cfg)
    run = bench_run(cfg, backend)
    trainer = Trainer(run)  # the timed step is the trainer's own ``train_step``, not a copy of it
    return dict(cfg=cfg, backend=backend, model=run.model, raw=run.raw, optimizer=run.optimizer,
                scheduler=run.scheduler, method=run.method, trainer=trainer, progress=float(t.epochs))


def datkit_step(d: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
    """One iteration of ``Trainer.train_epoch``'s loop minus data loading and the progress bar:
    the step's ``StepInfo`` (eps after the ramp, here at the end of training), then ``Trainer.train_step``."""
    cfg = d["cfg"]  # the loop reads cfg.attack.eps and cfg.attack.eps_warmup_epochs every step
    info = StepInfo(eps=eps_at(cfg.attack.eps, cfg.attack.eps_warmup_epochs, d["progress"]))
    d["trainer"].train_step(x, y, info)


def plain_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """l_inf PGD with a uniform random start, written out by hand."""
    x_adv = (x + (2 * torch.rand_like(x) - 1) * eps).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)
    return x_adv.detach()


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               eps: float, alpha: float, steps: int, lam: float) -> None:
    """One PGD-AT step: attack, cross-entropy, zero_grad, backward, step."""
    x_adv = plain_pgd(model, x, y, eps, alpha, steps)
    loss = F.cross_entropy(model(x_adv), y)
    loss = loss + lam * F.cross_entropy(model(x), y) if lam > 0 else loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def build_plain(d: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of datkit's (unwrapped) model and a fresh optimizer of the same class and settings."""
    plain = copy.deepcopy(d["raw"])
    return plain, type(d["optimizer"])(plain.parameters(), **d["optimizer"].defaults)


def make_batches(args: argparse.Namespace, cfg: Any, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``args.batch``: uniform [0, 1] noise of shape (N, 1, 28, 28), or mnist5k images."""
    g = torch.Generator().manual_seed(0)
    if args.data == "random":
        return [(torch.rand(args.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
                for _ in range(count)]
    x_all, y_all = build_data(cfg.data).train.tensors
    idx = torch.randperm(len(y_all), generator=g)[: count * args.batch].view(count, -1)
    return [(x_all[i], y_all[i]) for i in idx]


def run(args: argparse.Namespace, d: dict[str, Any]) -> dict[str, Any]:
    """Copy datkit's model for the plain side, alternate the iterations, return timings and ratio."""
    cfg, device = d["cfg"], d["backend"].device
    a = cfg.attack  # the same eps / alpha that datkit's PGDTraining.training_attack uses
    eps, alpha = a.eps, (a.alpha if a.alpha is not None else 2.5 * a.eps / a.steps)
    plain, plain_opt = build_plain(d)
    batches = make_batches(args, cfg)
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times: dict[str, list[float]] = {"datkit": [], "plain": []}
    for i in range(args.warmup + args.iters):
        x, y = batches[i % len(batches)]
        for name in (("datkit", "plain") if i % 2 == 0 else ("plain", "datkit")):
            sync()
            t0 = time.perf_counter()
            if name == "datkit":
                datkit_step(d, x, y)
            else:  # the plain loop moves its batch to the device as well
                plain_step(plain, plain_opt, x.to(device), y.to(device), eps, alpha, a.steps, cfg.method.lam)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    d["backend"].close()
    stats = {k: {"median_s": statistics.median(v), "mean_s": statistics.fmean(v), "min_s": min(v), "times_s": v}
             for k, v in times.items()}
    ratio = stats["datkit"]["median_s"] / stats["plain"]["median_s"]
    paired = statistics.median(td / tp for td, tp in zip(times["datkit"], times["plain"]))  # same-round pairs
    setup = {"model": cfg.model.name, "batch": args.batch, "pgd_steps": a.steps, "eps": eps, "alpha": alpha,
             "lam": cfg.method.lam, "optimizer": type(d["optimizer"]).__name__, "device": str(device),
             "threads": torch.get_num_threads(),
             "iters": args.iters, "warmup": args.warmup, "data": args.data, "torch": torch.__version__}
    return {"setup": setup, **stats, "ratio": ratio, "paired_ratio_median": paired, "target": TARGET,
            "reached": ratio <= TARGET}


def plain_step_seconds(iters: int = 8, warmup: int = 2, batch: int = 128, steps: int = 7) -> float:
    """This machine's speed, in the unit every published time sits next to: the median seconds of a hand-written
    PGD-7 training step of ``cnn_small`` (batch 128 of random MNIST-shaped data, Adam, one thread) -- the
    ``plain`` column of ``bench step --threads 1``. Takes about (iters + warmup) x 0.5 s on a 2-core CI machine."""
    cfg = load_config(None, ["model.name=cnn_small", "data.name=mnist5k", "device=cpu"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg, DATASETS.get(cfg.data.name))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
        eps = cfg.attack.eps
        times = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            plain_step(model, opt, x, y, eps, 2.5 * eps / steps, steps, cfg.method.lam)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def report(res: dict[str, Any]) -> str:
    """A small Markdown table of the two sides and the ratio line."""
    s = res["setup"]
    lines = [f"PGD-AT step: {s['model']}, batch {s['batch']}, PGD-{s['pgd_steps']} eps={s['eps']:g} "
             f"alpha={s['alpha']:.4g}, lam={s['lam']:g}, {s['optimizer']}, {s['device']}, {s['threads']} thread(s), "
             f"{s['iters']} alternated iterations after {s['warmup']} warm-up, {s['data']} data", "",
             "| loop | median (s/step) | mean (s/step) | min (s/step) |", "|---|---|---|---|"]
    for name, label in (("datkit", "datkit"), ("plain", "plain PyTorch")):
        r = res[name]
        lines.append(f"| {label} | {r['median_s']:.4f} | {r['mean_s']:.4f} | {r['min_s']:.4f} |")
    lines += ["", f"ratio datkit/plain (median): {res['ratio']:.3f}  "
              f"(target <= {res['target']}: {'reached' if res['reached'] else 'NOT reached'})"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m datkit.bench step``; returns the exit code (2 on a bad setting)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.iters < 1 or args.warmup < 0 or args.batch < 1 or args.steps < 1:
            raise ValueError("--iters, --batch and --steps must be >= 1, --warmup >= 0")
        d = build_datkit(args)
    except (ValueError, KeyError, RuntimeError) as err:  # ConfigError is a ValueError
        print(f"datkit.bench step: error: {err}", file=sys.stderr)
        return 2
    res = run(args, d)
    print(report(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
