"""The training core: one loop over a :class:`~datkit.engine.run.Run`, written against the Backend interface only.

Per step: the method builds its loss (attacks on the unwrapped model, forward passes through the
backend's model), the backend back-propagates and synchronises gradients, the optimizer steps.
Per epoch: TA / RA on the (sharded) test subset, C (communication seconds) and T (training seconds),
a checkpoint. Every per-sample draw (attack start, TRADES' start, smoothing noise, random shifts) is keyed by
(seed, epoch, the sample's global position in the epoch) through ``datkit.randomness``, never by the rank: M
workers x B take exactly the step of 1 worker x M*B, with or without gradient accumulation, and resuming from
an epoch's checkpoint reproduces the uninterrupted run. The global RNG (a model's own dropout) is re-seeded at
every epoch from (seed, epoch, rank). Mid-epoch checkpoints (``train.checkpoint_every_steps``, and the one written
when SIGUSR1/SIGTERM stops the run: ``datkit.engine.preemption``) hold the epoch's partial state
(``datkit.engine.epoch_state``): a resumed run continues at the next step and ends as the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from datkit import randomness
from datkit.data import iterate_batches, random_shift
from datkit.methods import StepInfo

from . import fault_injection
from .checkpointing import TrainingCheckpoints
from .epoch_state import EpochProgress, restore_ranks
from .nonfinite import NonFiniteGuard
from .overfitting import OverfittingCheck
from .preemption import EXIT_PREEMPTED, Preempted, StopSignals, signal_name, who_got_what
from .results import ResultsWriter
from .run_evaluation import RunEvaluation

if TYPE_CHECKING:  # only an annotation: run.py builds runs and hands them to this loop
    from .run import Run

class Trainer:
    """Trains a :class:`~datkit.engine.run.Run` (built by ``build_run``): epochs, evaluation (``self.evaluation``,
    ``datkit.engine.run_evaluation``), checkpoints (``self.checkpoints``, ``datkit.engine.checkpointing``), results.

    Restores ``run.resume_from`` (a resumed run) when it is created; opens the results files (rank 0) when
    ``train()`` starts, so a Trainer made only to time ``train_step`` (``datkit.bench``) writes nothing.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.cfg, self.backend, self.data = run.cfg, run.backend, run.data
        self.model, self.raw, self.optimizer, self.scheduler = run.model, run.raw, run.optimizer, run.scheduler
        self.method, self.sampler, self.steps_per_epoch = run.method, run.sampler, run.steps_per_epoch
        self.recipe_info = run.recipe_info
        self.out = self.cfg.train.output_dir
        self.nonfinite = NonFiniteGuard(self.cfg.train.nonfinite, self.cfg.train.max_nonfinite_skips, self.backend)
        self.position = (0, 0)  # (epoch, step) of the step being trained
        self.step_skipped = False
        self.start_epoch, self.records = 1, []
        self.resume_progress: EpochProgress | None = None  # a mid-epoch checkpoint's partial epoch
        self.stop_signals = StopSignals()  # installed while train() runs
        self.checkpoints = TrainingCheckpoints(self.cfg, self.backend, self.model, self.optimizer, self.scheduler,
                                               self.steps_per_epoch)
        if run.resume_from is not None:
            self.records = self._load(run.resume_from)
        self.writer: ResultsWriter | None = None
        self.evaluation = RunEvaluation(self.cfg, self.backend, self.raw, self.data, self.method)
        self.overfitting = OverfittingCheck(self.cfg, self.backend, self.raw, self.data.train, self.records,
                                            self.method)
        self.co_fired: dict[str, Any] | None = next(  # a resumed run that had fired keeps it
            (r["co_fired"] for r in self.records if isinstance(r.get("co_fired"), dict)), None)

    # --- one epoch ---------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """Train one epoch (from a mid-epoch checkpoint's next step when resuming into it); returns (mean loss over
        workers, T seconds, C seconds).

        ``self.bytes_per_iter`` is set to the bytes of gradient communication per step of this epoch,
        ``self.nonfinite_skipped`` to the steps skipped for a NaN/Inf (``train.nonfinite=skip``). Writes the
        mid-epoch checkpoints of ``train.checkpoint_every_steps``; raises ``Preempted`` (exit code 75) after the
        step at which the workers agreed that one of them got SIGUSR1/SIGTERM, its checkpoint written.
        """
        cfg, be = self.cfg, self.backend
        p = self.resume_progress or EpochProgress(epoch, nonfinite_consecutive=self.nonfinite.consecutive)
        self.resume_progress = None
        torch.manual_seed(cfg.train.seed * 1_000_003 + epoch * 1_009 + be.rank)
        self.sampler.set_epoch(epoch, start=p.next_step)  # the earlier batches are not read again
        batches = iterate_batches(self.data.train, self.sampler, cfg.data.num_workers)  # a DataLoader draws its seed
        if p.ranks is not None and not restore_ranks(p, be) and be.is_main:  # then the epoch goes on from its state
            print(f"datkit: the checkpoint's per-rank states are for {p.ranks['world_size']} workers, this run has "
                  f"{be.world_size}: the model's own random draws (dropout) start from epoch {epoch}'s seed",
                  flush=True)
        self.nonfinite.skipped, self.nonfinite.consecutive = p.nonfinite_skipped, p.nonfinite_consecutive
        self.model.train()
        be.comm_seconds()  # reset the communication timer and byte counter
        be.comm_bytes()
        loss_sum, steps = torch.tensor(p.loss_sum, dtype=torch.float64), p.steps
        bar = tqdm(total=self.steps_per_epoch, initial=min(p.next_step, self.steps_per_epoch), leave=False,
                   desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not (be.is_main and cfg.log.progress),
                   dynamic_ncols=True)
        start = time.perf_counter()
        for step, (x, y) in enumerate(batches, start=p.next_step):
            if step >= self.steps_per_epoch:
                break
            keys = randomness.sample_keys(cfg.train.seed, epoch, self.sampler.positions(step))
            fault_injection.maybe_kill(be.rank, epoch, step)  # test-only (env DATKIT_TEST_KILL_AT_STEP)
            fault_injection.maybe_signal(be.rank, epoch, step)  # test-only (env DATKIT_TEST_SIGNAL_AT_STEP)
            fault_injection.maybe_hold(be.rank, epoch, step, lambda: self.stop_signals.signum,  # test-only (env)
                                       resumed=self.run.resume_from is not None)
            info = StepInfo(eps=self.method.train_eps(epoch - 1 + step / self.steps_per_epoch))
            self.position = (epoch, step)
            step_loss = self.train_step(x, y, info, keys)
            if not self.step_skipped:  # a skipped (non-finite) step's loss stays out of the epoch's mean
                loss_sum += step_loss
                steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", eps=f"{info.eps:.3f}")
            signals = self.nonfinite.stop_signals  # every rank's, exchanged in train_step's check
            if any(signals) or self.checkpoints.due_after_step(epoch, step):
                p = EpochProgress(epoch, step + 1, float(loss_sum), steps, p.T_s + time.perf_counter() - start,
                                  p.C_s + be.comm_seconds(), p.bytes + be.comm_bytes(), self.nonfinite.skipped,
                                  self.nonfinite.consecutive)
                if any(signals):
                    be.expect_exit()  # every worker stops now: a peer's exit or a launcher gone is no lost worker
                self.save(epoch - 1, progress=p)
                if any(signals):
                    bar.close()
                    self._preempted(signals, f"epoch {epoch} step {step}")
                be.comm_seconds()  # the checkpoint's own collectives are no gradient communication
                be.comm_bytes()
                start = time.perf_counter()  # nor is its time training time
        seconds = p.T_s + time.perf_counter() - start
        bar.close()
        comm = p.C_s + be.comm_seconds()
        self.bytes_per_iter = (p.bytes + be.comm_bytes()) / max(1, steps)
        self.nonfinite_skipped = self.nonfinite.take_epoch_count()
        stats = be.all_reduce(torch.tensor([float(loss_sum), steps], dtype=torch.float64, device=be.device), op="sum")
        return float(stats[0] / max(1.0, float(stats[1]))), seconds, comm

    def _preempted(self, signals: list[int], where: str) -> None:
        """Every worker: raise ``Preempted`` (exit 75) once the checkpoint after ``where`` is written (rank 0 says)."""
        message = (f"datkit: got {who_got_what(signals)}: checkpoint after {where} written to "
                   f"{self.checkpoints.path}; exit {EXIT_PREEMPTED} (requeue and resume with "
                   "train.resume=true)")
        if self.backend.is_main:
            try:
                print(message, flush=True)
            except OSError:  # stdout is a pipe to a launcher that the signal killed (horovodrun on SIGUSR1)
                pass
        if self.writer is not None:
            self.writer.close()
        raise Preempted(message)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, info: StepInfo, keys: list[int] | None = None) -> float:
        """One optimizer step on this worker's shard ``(x, y)`` of a global batch; returns its loss.

        ``keys`` (one per example, ``datkit.randomness.sample_keys``) key the examples' random draws; None: the
        global RNG. Micro-batches (``train.grad_accum``) accumulate locally under ``backend.no_sync``; the last
        one synchronises gradients. ``datkit.bench step`` times exactly this method.
        """
        cfg, be = self.cfg, self.backend
        accum = cfg.train.grad_accum
        step_loss = 0.0
        with randomness.keyed(keys):  # the whole local batch; each micro-batch continues its draw count
            x = random_shift(x, cfg.data.augment_shift).to(be.device, non_blocking=True)
            y = y.to(be.device, non_blocking=True)
            starts = [0]
            for ym in y.chunk(accum):
                starts.append(starts[-1] + len(ym))
            for k, (xm, ym) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
                km = keys[starts[k] : starts[k + 1]] if keys is not None else None
                with (be.no_sync(self.model) if k < accum - 1 else contextlib.nullcontext()), randomness.keyed(km):
                    loss = self.method.loss(self.model, self.raw, xm, ym, info) / accum
                    loss = fault_injection.inject(loss, self.raw, be.rank, *self.position)  # test-only NaN (env)
                    be.backward(loss)
                step_loss += float(loss.detach())
        epoch, step = self.position
        # collective, before the step; it also shares the stop signals (SIGUSR1/SIGTERM) the workers got
        self.step_skipped = self.nonfinite.check(step_loss, self.model, epoch, step, self.stop_signals.signum)
        if self.step_skipped:
            be.skip_step(self.optimizer)
            self.scheduler.step()
            return step_loss
        if cfg.train.grad_clip > 0:
            be.clip_grad_norm(self.model, cfg.train.grad_clip)
        be.step(self.optimizer)
        self.scheduler.step()
        return step_loss

    # --- the run -----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train all remaining epochs, then evaluate on the final test set; returns the ``final`` record."""
        cfg, be = self.cfg, self.backend
        if be.is_main and self.writer is None:
            self.writer = ResultsWriter(self.out, OmegaConf.to_container(cfg, resolve=True), cfg.log.tensorboard,
                                        cfg.log.plot, self.records)
        if be.is_main:
            print(f"datkit: {be.describe()} | {cfg.method.name} on {cfg.data.name} ({len(self.data.train)} train), "
                  f"model {cfg.model.name}, eval on {self.data.test_name} | output {self.out}", flush=True)
        with self.stop_signals:  # SIGUSR1 / SIGTERM only set a flag until training ends (previous handlers restored)
            for epoch in range(self.start_epoch, cfg.train.epochs + 1):
                if self.co_fired is not None and cfg.eval.co_action == "stop":
                    break  # a resumed run that had stopped for catastrophic overfitting
                if self._epoch(epoch):
                    break
            final = self.finish()
        if self.stop_signals.signum:  # after the last epoch's agreement: the final evaluation was not interrupted
            print(f"datkit: got {signal_name(self.stop_signals.signum)} on rank {be.rank} during the final evaluation; "
                  "the run finished", file=sys.stderr, flush=True)
        return final

    def _epoch(self, epoch: int) -> bool:
        """Train and evaluate ``epoch``, record and checkpoint it; True when training stops here (catastrophic
        overfitting with ``eval.co_action=stop``). Raises ``Preempted`` when a worker got SIGUSR1/SIGTERM during the
        epoch's evaluation (after its last step's agreement), once the epoch's checkpoint is written."""
        cfg = self.cfg
        loss, seconds, comm = self.train_epoch(epoch)
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "TA": None, "RA": None, "C_s": comm,
                                  "T_s": seconds, "bytes_per_iter": self.bytes_per_iter,
                                  "nonfinite_skipped": self.nonfinite_skipped, "lr": self.scheduler.get_last_lr()[0],
                                  "eps": self.method.train_eps(epoch)}
        if epoch % cfg.eval.every == 0 or epoch == cfg.train.epochs:
            t0 = time.perf_counter()
            ev = self.evaluation.epoch_evaluation(epoch)
            record.update(TA=ev["TA"], RA=ev.get("RA"), n_eval=ev["n"], eval_s=time.perf_counter() - t0)
            record.update({k: v for k, v in ev.items() if k not in ("TA", "RA", "n")})  # the method's columns (VA, VE)
        fired = self._check_overfitting(epoch, record)
        self.records.append(record)
        if self.writer is not None:
            self.writer.add_epoch(record)
            ta = "-" if record["TA"] is None else f"{record['TA']:.4f}"
            ra = "-" if record["RA"] is None else f"{record['RA']:.4f}"
            va = f"  VA {record['VA']:.4f}" if record.get("VA") is not None else ""
            co = f"  RA(train) {record['co_RA']:.4f}" if record.get("co_RA") is not None else ""
            print(f"epoch {epoch}: loss {loss:.4f}  TA {ta}  RA {ra}{va}{co}  C {comm:.2f}s  T {seconds:.2f}s",
                  flush=True)
        stop = fired and cfg.eval.co_action == "stop"
        saved = self.checkpoints.due_after_epoch(epoch) or stop
        if saved:
            self.save(epoch)
        signals = self.nonfinite.share_stop_signal(self.stop_signals.signum)  # one float per worker per epoch
        if any(signals):
            self.backend.expect_exit()
            if not saved:
                self.save(epoch)
            self._preempted(signals, f"epoch {epoch}")
        return stop

    def _check_overfitting(self, epoch: int, record: dict[str, Any]) -> bool:
        """The catastrophic-overfitting check (``datkit.engine.overfitting``) after ``epoch``: records ``co_RA``;
        True when it fires (the first time: a warning on rank 0 and ``co_fired`` in the record)."""
        if not self.overfitting.enabled:
            return False
        best = self.overfitting.best
        acc, why = self.overfitting.check()
        record.update(acc)
        if why is None or self.co_fired is not None:
            return why is not None
        self.co_fired = {"epoch": epoch, "co_RA": acc["co_RA"], "co_own": acc.get("co_own"), "best": best, "why": why}
        record["co_fired"] = self.co_fired
        if self.backend.is_main:
            print(self.overfitting.warning(epoch, why), flush=True)
        return True

    def finish(self) -> dict[str, Any]:
        """Final evaluation (``eval.final_num_samples``) and all results files."""
        cfg, be = self.cfg, self.backend
        seconds, idx, ev, per_image = self.evaluation.final()
        atk = self.evaluation.ra  # the RA column's attack
        final = {"TA": ev["TA"], "RA": ev.get("RA"), "n": ev["n"], "test_set": self.data.test_name, "eps": atk.eps,
                 "pgd_steps": atk.steps, "pgd_restarts": atk.restarts, "eval_s": seconds,
                 "train_time_s": sum(r["T_s"] for r in self.records), "C_s": sum(r["C_s"] for r in self.records),
                 "bytes_per_iter": (sum(r.get("bytes_per_iter", 0.0) for r in self.records) / len(self.records)
                                    if self.records else 0.0),
                 "nonfinite_skipped": sum(r.get("nonfinite_skipped", 0) for r in self.records),
                 "world_size": be.world_size, "backend": be.name, "epochs": cfg.train.epochs, **self.recipe_info,
                 **{k: v for k, v in ev.items() if k not in ("TA", "RA", "n")}}
        if cfg.eval.aa_samples > 0:
            final.update(self.evaluation.autoattack(idx, per_image))
        if self.co_fired is not None:
            final["catastrophic_overfitting"] = {**self.co_fired, "action": cfg.eval.co_action}
        if self.writer is not None:
            table = self.writer.write(final)
            self.writer.close()
            print("\n" + table + f"\n\nresults: {os.path.join(self.out, 'results.md')}", flush=True)
        return final

    # --- checkpoints (datkit.engine.checkpointing) ------------------------------------------------------
    def save(self, epoch: int, progress: EpochProgress | None = None) -> None:
        """Collective: checkpoint after ``epoch`` complete epochs (and, with ``progress``, part of the next one)."""
        self.checkpoints.save(epoch, self.records, self.nonfinite.consecutive, progress)

    def _load(self, path: str) -> list[dict[str, Any]]:
        """Restore a resumed run from ``path`` (``TrainingCheckpoints.restore``); returns the records so far."""
        resumed = self.checkpoints.restore(path)
        self.nonfinite.consecutive = resumed.nonfinite_consecutive
        self.start_epoch, self.resume_progress = resumed.start_epoch, resumed.progress
        return resumed.records
