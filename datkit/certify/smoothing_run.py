"""Certify a checkpoint's smoothed classifier on the test set, sharded across workers.

    python -m datkit.certify checkpoint=runs/mnist5k_smoothing/checkpoint_last.pt smoothing.n=10000
    torchrun --nproc_per_node 2 -m datkit.certify checkpoint=PATH smoothing.sigma=0.25 smoothing.num_samples=500

The run's configuration is rebuilt from the checkpoint (``datkit.checkpoint_jobs``, as in ``datkit.evaluate``);
``smoothing.*``, ``data.*``, ``device`` and ``backend`` overrides are merged on top (``smoothing.sigma`` defaults to the
sigma the checkpoint was trained with). ``smoothing.num_samples`` test images (a seeded subset) are split
over the workers (``indices[rank::world_size]``); every worker runs Cohen et al.'s CERTIFY
(:class:`datkit.certify.Smooth`) on its images with noise seeded from (``smoothing.seed``, image index)
only, so any number of workers, on any backend, produces the same rows. The rows are all-gathered and
rank 0 writes ``certify.tsv``, ``certify.md`` (certified accuracy at ``smoothing.radii``),
``certify.png`` and the ``certify`` entry of ``results.json`` into ``output_dir`` (default:
``certify_sigma<sigma>/`` next to the checkpoint). Start-up errors exit with code 2 and one message.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf

from datkit.checkpoint_jobs import (
    ROOT_SCALARS,
    is_config_override,
    job_argv,
    job_items,
    key_value,
    load_run,
    require_checkpoint,
)
from datkit.checkpoint_jobs import load_model as load_checkpoint_model
from datkit.cli import fail
from datkit.config import ConfigError
from datkit.preflight import validate_config

from . import smoothing_report as report
from .smoothed_classifier import Smooth, example_generator

OPTIONS: dict[str, Any] = {"checkpoint": None, "output_dir": None}

USAGE = """usage: python -m datkit.certify checkpoint=PATH [output_dir=DIR] [smoothing.sigma=0.25] [smoothing.n0=100]
         [smoothing.n=100000] [smoothing.alpha=0.001] [smoothing.batch_size=1000] [smoothing.num_samples=500]
         [smoothing.seed=0] [smoothing.radii=[0,0.05,...,0.5]]
         [training-config overrides, e.g. data.shared_root=... device=cpu]
       torchrun --nproc_per_node N -m datkit.certify checkpoint=PATH ...   (test images sharded over N workers)

Randomized smoothing (Cohen et al. 2019): certifies smoothing.num_samples test images (0 = all) of the checkpoint's
data set with n0 selection and n estimation samples each, at failure probability alpha. smoothing.sigma defaults to
the checkpoint's training sigma. Writes certify.tsv, certify.md, certify.png and results.json (entry "certify") to
output_dir (default: certify_sigma<sigma>/ next to the checkpoint)."""


def split_args(items: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(options, config dotlist): the bare options of ``OPTIONS`` and the dotted config overrides."""
    opts, overrides = dict(OPTIONS), []
    for item in items:
        key, value = key_value(item)
        if key in OPTIONS:
            opts[key] = value
        elif is_config_override(key):
            overrides.append(item)
        else:
            raise ConfigError(f"unknown option '{key}'; options: {', '.join(OPTIONS)}; certification settings are "
                              f"smoothing.* keys (e.g. smoothing.n=10000), other config overrides dotted keys or "
                              f"{', '.join(ROOT_SCALARS)}")
    require_checkpoint(opts["checkpoint"])
    return opts, overrides


def load_model(state: dict[str, Any], cfg, spec, path: str) -> torch.nn.Module:
    """The checkpoint's model (``datkit.checkpoint_jobs.load_model``); a ``ConfigError`` that names the model when the
    weights do not fit."""
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    what = (f"model '{cfg.model.name}' (kwargs {kwargs}, {cfg.data.name} data, {spec.num_classes} classes) of its "
            f"config (override model.name=/model.kwargs.*/data.name= to match it)")
    return load_checkpoint_model(state, cfg, spec, path, what, hint="is it a checkpoint of another model? ")


def certify_shard(backend, smooth: Smooth, dataset, indices: Sequence[int], sm, progress: bool) -> list[report.Row]:
    """Certify this worker's share ``indices[rank::world_size]``, gather every worker's rows (all ranks
    get them all), sorted by index."""
    from tqdm import tqdm

    from datkit.data import iterate_batches, shard_range

    mine = [indices[i] for i in shard_range(len(indices), backend.rank, backend.world_size)]
    per_rank = math.ceil(len(indices) / backend.world_size)
    local = torch.full((per_rank, len(report.COLUMNS)), -1.0, dtype=torch.float64)
    bar = tqdm(total=len(mine), desc=f"certify (sigma {smooth.sigma:g}, rank 0 of {backend.world_size})",
               disable=not (backend.is_main and progress), dynamic_ncols=True)
    certified = 0
    for k, (x, y) in enumerate(iterate_batches(dataset, [[i] for i in mine])):
        idx, label = mine[k], int(y[0])
        start = time.perf_counter()
        pred, radius = smooth.certify(x[0].to(backend.device), sm.n0, sm.n, sm.alpha, sm.batch_size,
                                      generator=example_generator(sm.seed, idx, backend.device))
        local[k] = torch.tensor([idx, label, pred, radius, float(pred == label), time.perf_counter() - start],
                                dtype=torch.float64)
        certified += pred == label
        bar.update(1)
        bar.set_postfix(correct=f"{certified}/{k + 1}")
    bar.close()
    gathered = backend.all_gather(local.to(backend.device)).cpu().reshape(-1, len(report.COLUMNS))
    rows = [dict(zip(report.COLUMNS, r)) for r in gathered.tolist() if r[0] >= 0]
    for r in rows:
        r.update(idx=int(r["idx"]), label=int(r["label"]), predict=int(r["predict"]), correct=bool(r["correct"]))
    return sorted(rows, key=lambda r: r["idx"])


def certify(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the certification named on the command line; returns the result record (all ranks) with its rows
    under ``"rows"``. Start-up errors print one message on stderr (rank 0) and raise ``SystemExit(2)``."""
    from datkit.backends import BackendUnavailable, create_backend
    from datkit.data import build_data, dataset_spec, eval_subset

    argv = job_argv(argv, USAGE)
    try:
        opts, dotlist = split_args(job_items(argv, "datkit.certify", " (e.g. smoothing.n=10000)"))
        state, cfg = load_run(opts["checkpoint"], dotlist)
        validate_config(cfg)
        spec = dataset_spec(cfg.data)  # data.resize applied
        model = load_model(state, cfg, spec, opts["checkpoint"])
        backend = create_backend(cfg, argv)
    except (ConfigError, BackendUnavailable, RuntimeError) as err:
        fail(err)
    try:
        sm = cfg.smoothing
        model = model.to(backend.device)
        data = build_data(cfg.data)
        indices = eval_subset(len(data.test), sm.num_samples, seed=sm.seed)
        out = opts["output_dir"] or os.path.join(os.path.dirname(os.path.abspath(opts["checkpoint"])),
                                                 f"certify_sigma{sm.sigma:g}")
        if backend.is_main:
            print(f"datkit.certify: {backend.describe()} | randomized smoothing of {cfg.model.name} "
                  f"({opts['checkpoint']}) "
                  f"on {len(indices)} images of {data.test_name}, sigma={sm.sigma:g} n0={sm.n0} n={sm.n} "
                  f"alpha={sm.alpha:g} | output {out}", flush=True)
        smooth = Smooth(model, spec.num_classes, sm.sigma)
        start = time.perf_counter()
        rows = certify_shard(backend, smooth, data.test, indices, sm, cfg.log.progress)
        seconds = time.perf_counter() - start
        trained = cfg.method.name + (f" (sigma {state_sigma(state):g})" if cfg.method.name == "smoothing" else "")
        res: dict[str, Any] = {"checkpoint": os.path.abspath(opts["checkpoint"]), "epoch": state.get("epoch"),
                               "model": cfg.model.name, "data": cfg.data.name, "test_set": data.test_name,
                               "trained_with": trained, "sigma": sm.sigma, "n0": sm.n0, "n": sm.n, "alpha": sm.alpha,
                               "batch_size": sm.batch_size, "seed": sm.seed, "num_examples": len(rows),
                               "radii": list(sm.radii), **report.summary(rows, list(sm.radii)), "time_s": seconds,
                               "world_size": backend.world_size, "backend": backend.name}
        if backend.is_main:
            table = report.markdown(res)
            os.makedirs(out, exist_ok=True)
            report.write_tsv(rows, os.path.join(out, "certify.tsv"))
            with open(os.path.join(out, "certify.md"), "w") as f:
                f.write(table + "\n")
            report.update_results_json(os.path.join(out, "results.json"), res)
            if cfg.log.plot:
                report.plot(rows, list(sm.radii), sm.sigma, os.path.join(out, "certify.png"))
            print(f"\n{table}\n\nresults: {out}", flush=True)
        backend.barrier()
        return {**res, "rows": rows}
    finally:
        backend.close()


def state_sigma(state: dict[str, Any]) -> float:
    """The smoothing sigma the checkpoint was trained with (its config), or nan if it has none."""
    cfg = OmegaConf.create(state["config"])
    return float(OmegaConf.select(cfg, "smoothing.sigma", default=float("nan")))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``python -m datkit.certify``): 0 on success."""
    certify(argv)
    return 0
