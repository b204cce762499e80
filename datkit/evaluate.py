"""Evaluate a datkit checkpoint: TA (clean), RA (PGD) and AA (AutoAttack) accuracy on the test set.

    python -m datkit.evaluate checkpoint=runs/mnist5k_pgd/checkpoint_last.pt attacks=[pgd,autoattack]
    torchrun --nproc_per_node 2 -m datkit.evaluate checkpoint=PATH   # the test set is sharded

The run's configuration is rebuilt from the checkpoint (``state["config"]``); any training-config
override (``data.shared_root=...``, ``device=cpu``) is merged on top. Evaluation options are the
bare keys of :data:`OPTIONS`. Every rank evaluates its shard of the test subset and the counts are
summed (``datkit.engine.evaluate.evaluate_per_image``); rank 0 prints a Markdown table and writes it as JSON
(``output``, default ``evaluation.json`` next to the checkpoint) and Markdown (same name, ``.md``).
Start-up errors exit with code 2 and one message on stderr. The command-line skeleton and the loading of the
run and its model are ``datkit.checkpoint_jobs``', shared with ``datkit.certify``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from datkit.checkpoint_jobs import (
    ROOT_SCALARS,
    is_config_override,
    job_argv,
    job_items,
    key_value,
    load_model,
    require_checkpoint,
)
from datkit.checkpoint_jobs import load_run as load_run  # re-exported: datkit.evaluate.load_run
from datkit.cli import fail
from datkit.config import ConfigError
from datkit.preflight import validate_config

# Evaluation options and their defaults. eps, pgd_alpha, pgd_steps, pgd_restarts, batch_size and
# num_samples are written into the run's config as eval.eps, eval.pgd_alpha, eval.pgd_steps,
# eval.pgd_restarts, eval.batch_size and eval.final_num_samples (eps=None keeps the run's eps).
OPTIONS: dict[str, Any] = {"checkpoint": None, "attacks": ["pgd", "autoattack"], "eps": None, "pgd_steps": 20,
                           "pgd_alpha": None, "pgd_restarts": 1, "num_samples": 0, "batch_size": 500, "output": None}
_EVAL_KEYS = {"eps": "eps", "pgd_alpha": "pgd_alpha", "pgd_steps": "pgd_steps", "pgd_restarts": "pgd_restarts",
              "batch_size": "batch_size", "num_samples": "final_num_samples"}
# attack name -> result column
COLUMNS: dict[str, str] = {"clean": "TA", "pgd": "RA", "autoattack": "AA", "fgsm": "FGSM", "verified": "VA"}

USAGE = """usage: python -m datkit.evaluate checkpoint=PATH [attacks=[pgd,autoattack]] [eps=0.3] [pgd_steps=20]
         [pgd_alpha=2.5*eps/pgd_steps] [pgd_restarts=1] [num_samples=0] [batch_size=500] [output=PATH.json]
         [training-config overrides, e.g. data.shared_root=../shared/data device=cpu]
       torchrun --nproc_per_node N -m datkit.evaluate checkpoint=PATH ...   (evaluation sharded over N workers)

attacks: any of clean (TA, always reported), pgd (RA), autoattack (AA, needs pip install "datkit[autoattack]"),
fgsm (FGSM: one step of size eps, no random start), verified (VA by the verification cascade bounds.verify, e.g.
bounds.verify=[ibp,crown-ibp,crown], with per-stage gains and times; any model with supported layers). eps defaults
to the run's eval.eps, else attack.eps; num_samples=0 evaluates the whole test set; batch_size is global (split
across workers). Numbers may be fractions (eps=8/255). The options are stored in the run's config as eval.eps,
eval.pgd_steps, eval.pgd_alpha, eval.pgd_restarts, eval.batch_size and eval.final_num_samples; bare options win over
eval.* overrides."""


def _number(key: str, text: str, kind: type) -> float | int:
    """``text`` as ``kind``; floats may be written as fractions (``eps=8/255``)."""
    try:
        if kind is float and "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return kind(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key}={text!r} is not {'an integer' if kind is int else 'a number'}") from None


def split_args(items: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(options, config dotlist): the evaluation options (bare keys of ``OPTIONS``, defaults filled in)
    and the config overrides to merge onto the checkpoint's config, in order: the defaults of the eval
    options, the user's training-config overrides, then the eval options given explicitly."""
    given: dict[str, Any] = {}
    overrides: list[str] = []
    for item in items:
        key, value = key_value(item)
        if key in ("checkpoint", "output"):
            given[key] = value
        elif key == "attacks":
            parsed = yaml.safe_load(value) if value.strip() else []
            names = parsed if isinstance(parsed, list) else str(parsed).split(",")
            given[key] = [str(n).strip() for n in names if str(n).strip()]
        elif key in ("eps", "pgd_alpha"):
            given[key] = _number(key, value, float)
        elif key in OPTIONS:
            given[key] = _number(key, value, int)
        elif is_config_override(key):
            overrides.append(item)
        else:
            raise ConfigError(f"unknown option '{key}'; evaluation options: {', '.join(OPTIONS)}; training-config "
                              f"overrides are dotted keys (e.g. data.shared_root=...) or {', '.join(ROOT_SCALARS)}")
    unknown = [n for n in given.get("attacks", []) if n not in COLUMNS]
    if unknown:
        raise ConfigError(f"unknown attack(s) {', '.join(map(repr, unknown))} in attacks=; known: {', '.join(COLUMNS)}")
    require_checkpoint(given.get("checkpoint"))
    opts = {**OPTIONS, **given}
    dotlist = [f"eval.{_EVAL_KEYS[k]}={'null' if OPTIONS[k] is None else OPTIONS[k]}" for k in _EVAL_KEYS if k != "eps"]
    dotlist += overrides + [f"eval.{_EVAL_KEYS[k]}={given[k]!r}" for k in _EVAL_KEYS if k in given]
    return opts, dotlist


def build_attacks(opts: dict[str, Any], cfg: Any, n_classes: int) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Column -> (attack or None, its settings). TA always comes first."""
    from datkit.attacks import FGSM, AutoAttack
    from datkit.engine import ra_attack

    norm = cfg.attack.norm
    out: dict[str, tuple[Any, dict[str, Any]]] = {"TA": (None, {"attack": "clean"})}
    for name in opts["attacks"]:
        col = COLUMNS[name]
        if col in out:
            continue
        if name == "verified":
            out[col] = _verified_accuracy(cfg, n_classes)
        elif name == "pgd":
            atk = ra_attack(cfg.eval, cfg.attack.eps, norm)
            out[col] = (atk, {"attack": "pgd", "norm": norm, "eps": atk.eps, "steps": atk.steps, "alpha": atk.alpha,
                              "restarts": atk.restarts})
        else:
            eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps
            try:
                atk = (AutoAttack(eps, norm, version="standard", n_classes=n_classes) if name == "autoattack"
                       else FGSM(eps, alpha=eps, random_start=False, norm=norm, eval_mode=True))
            except ImportError as err:
                raise ConfigError(f"attacks={name}: {err}") from None
            except ValueError as err:
                raise ConfigError(f"attacks={name} with attack.norm={norm}: {err}") from None
            extra = {"version": "standard"} if name == "autoattack" else {"steps": 1, "alpha": eps}
            out[col] = (atk, {"attack": name, "norm": norm, "eps": eps, **extra})
    return out


def _verified_accuracy(cfg: Any, n_classes: int) -> tuple[Any, dict[str, Any]]:
    """VA by the cascade ``bounds.verify`` at ``eval.eps``, with the RA attack's deterministic twin as the falsifier
    before full CROWN (``datkit.certify.cascade``)."""
    from datkit.certify.cascade import VerifiedAccuracy, pgd_falsifier, stages_of, verify_errors

    if cfg.attack.norm != "linf":
        raise ConfigError(f"attacks=verified: the bounds certify l_inf balls only (attack.norm={cfg.attack.norm})")
    errors = verify_errors(cfg.bounds.verify, cfg.bounds.engine)
    if errors:
        raise ConfigError(errors[0])
    eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps
    metric = VerifiedAccuracy(eps, cfg.bounds.verify, cfg.bounds.engine, n_classes, pgd_falsifier(cfg.eval, eps))
    return metric, {"attack": "verified", "eps": eps, "stages": list(stages_of(cfg.bounds.verify))}


class _Timed:
    """Calls ``attack`` and adds the (device-synchronised) seconds it took to ``seconds``."""

    def __init__(self, attack: Callable[..., torch.Tensor], sync: Callable[[], None]) -> None:
        self.attack, self.sync, self.seconds = attack, sync, 0.0

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.sync()
        start = time.perf_counter()
        out = self.attack(model, x, y)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out


def _settings(s: dict[str, Any]) -> str:
    if s["attack"] == "clean":
        return "clean inputs"
    if s["attack"] == "pgd":
        return f"PGD-{s['steps']}, {s['norm']} eps={s['eps']:.4g}, alpha={s['alpha']:.4g}, restarts={s['restarts']}"
    if s["attack"] == "fgsm":
        return f"FGSM, {s['norm']} eps={s['eps']:.4g}, step {s['alpha']:.4g}"
    if s["attack"] == "verified":
        return f"verification cascade {' -> '.join(s['stages'])}, linf eps={s['eps']:.4g}"
    robust = s.get("pgd_robust_attacked")
    return f"AutoAttack ({s['version']}), {s['norm']} eps={s['eps']:.4g}" + (
        f", on the {robust} PGD-robust images" if robust is not None else "")


def markdown(res: dict[str, Any]) -> str:
    """The accuracy table (n and one column per metric) and the attack settings with their timing."""
    cols = list(res["attacks"])
    lines = [f"Evaluation of {res['checkpoint']} (epoch {res['epoch']}, {res['model']} on {res['data']}) "
             f"on {res['test_set']}, {res['world_size']} worker(s):", "",
             "| n | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
             f"| {res['n']} | " + " | ".join(f"{res[c]:.4f}" for c in cols) + " |", "",
             "| column | attack | settings | time (s) |", "|---|---|---|---|"]
    for c, s in res["attacks"].items():
        t = "-" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        lines.append(f"| {c} | {s['attack']} | {_settings(s)} | {t} |")
    if "VA" in res:
        from datkit.engine.results import cascade_table

        lines += cascade_table({"eps": res["attacks"]["VA"]["eps"], **res})
    return "\n".join(lines)


def evaluate(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate the checkpoint named on the command line; returns the result record (all ranks).

    Start-up errors print one message on stderr (rank 0) and raise ``SystemExit(2)``.
    """
    from datkit.backends import BackendUnavailable, create_backend
    from datkit.data import build_data, dataset_spec, eval_subset
    from datkit.engine.evaluate import evaluate_per_image

    argv = job_argv(argv, USAGE)
    try:
        opts, dotlist = split_args(job_items(argv, "datkit.evaluate"))
        state, cfg = load_run(opts["checkpoint"], dotlist)
        validate_config(cfg)
        spec = dataset_spec(cfg.data)  # data.resize applied
        attacks = build_attacks(opts, cfg, spec.num_classes)
        backend = create_backend(cfg, argv)
    except (ConfigError, BackendUnavailable, RuntimeError) as err:
        fail(err)
    try:
        if cfg.eval.batch_size < backend.world_size:
            fail(ConfigError(f"batch_size={cfg.eval.batch_size} must be >= the number of workers "
                             f"({backend.world_size})"))
        kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
        what = (f"model '{cfg.model.name}' (kwargs {kwargs}, {cfg.data.name} data) of its config (if that model's "
                f"definition changed since, override model.name=/model.kwargs.*)")
        try:
            model = load_model(state, cfg, spec, opts["checkpoint"], what)
        except ConfigError as err:
            fail(err)
        model = model.to(backend.device)
        data = build_data(cfg.data)
        idx = eval_subset(len(data.test), cfg.eval.final_num_samples, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed + backend.rank)  # what is not keyed: AutoAttack's own draws (torchattacks)
        sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
        # AA goes its own way (datkit.engine.autoattack_eval): only PGD-robust images reach AutoAttack (the RA
        # column's per-image outcomes, when it was asked for), dealt out evenly over the workers
        per_image = {c: a for c, a in attacks.items() if c != "AA"}
        timed = {c: (None if atk is None else atk if c == "VA" else _Timed(atk, sync))
                 for c, (atk, _) in per_image.items()}
        start = time.perf_counter()
        acc, outcomes = evaluate_per_image(backend, model, data.test, idx, cfg.eval.batch_size, timed,
                                           seed=cfg.train.seed)
        seconds = [t.seconds for t in timed.values() if isinstance(t, _Timed)]
        if "AA" in attacks:
            from datkit.engine import ra_attack
            from datkit.engine.autoattack_eval import evaluate_autoattack

            aa = evaluate_autoattack(backend, model, data.test, idx, cfg.eval.batch_size,
                                     ra_attack(cfg.eval, cfg.attack.eps, cfg.attack.norm), attacks["AA"][0],
                                     seed=cfg.train.seed, progress=cfg.log.progress,
                                     robust=outcomes["TA"] & outcomes["RA"] if "RA" in outcomes else None)
            acc["AA"] = aa["AA"]
            attacks["AA"][1]["pgd_robust_attacked"] = aa["n_aa_attacked"]
            seconds.append(aa["aa_s"])
        secs = torch.tensor([time.perf_counter() - start] + seconds, dtype=torch.float64)
        secs = backend.all_reduce(secs.to(backend.device), op="max").cpu().tolist()  # the slowest worker
        timings = iter(secs[1:])
        order = [c for c in per_image if isinstance(timed[c], _Timed)] + (["AA"] if "AA" in attacks else [])
        timing = dict(zip(order, timings))
        settings = {c: {**s, "seconds": timing.get(c)} for c, (atk, s) in attacks.items()}
        res: dict[str, Any] = {"checkpoint": os.path.abspath(opts["checkpoint"]), "epoch": state.get("epoch"),
                               "model": cfg.model.name, "data": cfg.data.name, "test_set": data.test_name,
                               "n": acc["n"], **{c: acc[c] for c in attacks},
                               **{k: v for k, v in acc.items() if k.startswith(("VA_", "VE"))}, "attacks": settings,
                               "eval_s": secs[0],
                               "world_size": backend.world_size, "backend": backend.name}
        if backend.is_main:
            table = markdown(res)
            out = opts["output"] or os.path.join(os.path.dirname(os.path.abspath(opts["checkpoint"])),
                                                 "evaluation.json")
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(res, f, indent=2)
            with open(os.path.splitext(out)[0] + ".md", "w") as f:
                f.write(table + "\n")
            print(f"\n{table}\n\nevaluation took {secs[0]:.1f} s; results: {out}", flush=True)
        return res
    finally:
        backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``datkit-evaluate``, ``python -m datkit.evaluate``): 0 on success."""
    evaluate(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
