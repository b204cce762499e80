"""Results of a run in the DAT paper's columns: ``results.json``, ``results.md``, ``metrics.jsonl``,
TensorBoard events and ``curves.png``. Only rank 0 writes (the trainer creates this on rank 0 only).

Per-epoch record keys: ``epoch, train_loss, TA, RA, C_s, T_s`` (plus ``eval_s``, ``lr``, ``eps``,
``n_eval``). ``C_s`` = seconds of gradient communication in the epoch; ``T_s`` = wall time of the
epoch's training (evaluation excluded, it is ``eval_s``); ``bytes_per_iter`` = bytes of gradient
communication one worker sent per optimizer step (``datkit.compress.accounting``'s model). Certified
training adds ``VA`` / ``VE`` (verified accuracy / error at ``eval.eps``), shown next to TA and RA, ``VA_gap``
(RA - VA) and the verification cascade's ``VA_gain_<stage>`` / ``VA_time_<stage>_s`` (``datkit.certify.cascade``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

COLUMNS = [("epoch", "epoch", "{}"), ("train_loss", "loss", "{:.4f}"), ("TA", "TA", "{:.4f}"), ("RA", "RA", "{:.4f}"),
           ("C_s", "C (s)", "{:.2f}"), ("T_s", "T (s)", "{:.2f}"), ("bytes_per_iter", "bytes/iter", "{:,.0f}")]
# Columns shown (after RA) only when some record has them: the evaluation columns of certified training and the
# catastrophic-overfitting check's probe (co_RA, co_own: datkit.engine.overfitting).
OPTIONAL_COLUMNS = [("VA", "VA", "{:.4f}"), ("VE", "verified err", "{:.4f}"), ("VA_gap", "RA - VA", "{:.4f}"),
                    ("co_RA", "RA (train probe)", "{:.4f}"), ("co_own", "own attack (train probe)", "{:.4f}")]
# The final evaluation in the DAT paper's Table 1 columns (AA, VA: when evaluated).
FINAL_COLUMNS = [("TA", "TA", "{:.4f}"), ("RA", "RA", "{:.4f}"), ("AA", "AA", "{:.4f}"), ("VA", "VA", "{:.4f}"),
                 ("C_s", "C (s)", "{:.1f}"), ("train_time_s", "T (s)", "{:.1f}"),
                 ("bytes_per_iter", "bytes/iter", "{:,.0f}")]


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return spec.format(value)


def cascade_table(final: dict[str, Any]) -> list[str]:
    """The verification cascade's lines (``datkit.certify.cascade``): per stage the fraction it added and its
    seconds, then VA, RA and the gap RA - VA; none when the record has no stage columns."""
    stages = [k[len("VA_gain_"):] for k in final if k.startswith("VA_gain_")]
    if not stages:
        return []
    lines = ["", f"Verification cascade at eps={final.get('eps')} (each stage bounds only what the earlier ones left "
             "unverified; seconds summed over workers):", "", "| stage | verified (added) | time (s) |",
             "|---|---|---|"]
    lines += [f"| {s} | +{final[f'VA_gain_{s}']:.4f} | {_fmt(final.get(f'VA_time_{s}_s'), '{:.2f}')} |" for s in stages]
    total = sum(final.get(f"VA_time_{s}_s") or 0.0 for s in stages)
    lines.append(f"| **VA** (all stages) | **{final['VA']:.4f}** | {total:.2f} |")
    if final.get("RA") is not None:
        lines += [f"| RA (PGD) | {final['RA']:.4f} | |",
                  f"| unresolved gap RA - VA | {_fmt(final.get('VA_gap'), '{:.4f}')} | |"]
    return lines


def markdown_table(records: list[dict[str, Any]], final: dict[str, Any] | None = None) -> str:
    """The per-epoch table, and the final evaluation below it."""
    extra = [c for c in OPTIONAL_COLUMNS if any(r.get(c[0]) is not None for r in records)]
    cols = COLUMNS[:4] + extra + COLUMNS[4:]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(k), s) for k, _, s in cols) + " |")
    if final:
        cols = [c for c in FINAL_COLUMNS if final.get(c[0]) is not None]
        lines += ["", "Final evaluation:", "", "| " + " | ".join(h for _, h, _ in cols) + " |",
                  "|" + "---|" * len(cols),
                  "| " + " | ".join(_fmt(final.get(k), f) for k, _, f in cols) + " |"]
        lines += cascade_table(final)
        if final.get("AA") is not None:
            lines += ["", f"AA: standard AutoAttack (torchattacks) at eps={final.get('eps')} on n={final.get('n_aa')} "
                      f"test examples ({final.get('n_aa_attacked')} PGD-robust ones attacked), "
                      f"{final.get('aa_s', 0):.1f} s."]
        co = final.get("catastrophic_overfitting")
        if co:
            lines += ["", f"**Catastrophic overfitting** detected after epoch {co['epoch']} on the training probe: "
                      f"{co['why']} (eval.co_action={co['action']})."]
        lines += ["", f"Final evaluation on {final.get('test_set', '?')} (n={final.get('n')}): "
                  f"**TA {final['TA']:.4f}**, "
                  + (f"**RA {final['RA']:.4f}** (PGD-{final.get('pgd_steps')}, eps={final.get('eps')}, "
                     f"restarts={final.get('pgd_restarts')}); " if final.get("RA") is not None
                     else "RA not evaluated; ")
                  + "".join(f"**{h} {final[k]:.4f}**; " for k, h, _ in OPTIONAL_COLUMNS if final.get(k) is not None) +
                  f"training time {final.get('train_time_s', 0):.1f} s, communication {final.get('C_s', 0):.2f} s, "
                  f"{final.get('world_size')} worker(s), backend {final.get('backend')}."]
    return "\n".join(lines)


class ResultsWriter:
    """Accumulates epoch records and writes every results file into ``output_dir``."""

    def __init__(self, output_dir: str, config: dict[str, Any], tensorboard: bool = True, plot: bool = True,
                 records: list[dict[str, Any]] | None = None) -> None:
        self.output_dir, self.config, self.plot = output_dir, config, plot
        self.records: list[dict[str, Any]] = list(records or [])
        os.makedirs(output_dir, exist_ok=True)
        # A resumed run rewrites metrics.jsonl from the checkpoint's records: epochs trained after the
        # checkpoint by the interrupted run must not be listed twice.
        with open(os.path.join(output_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tb"),
                                     purge_step=len(self.records) + 1 if self.records else None)

    def add_epoch(self, record: dict[str, Any]) -> None:
        """Append one epoch: a line of ``metrics.jsonl`` and TensorBoard scalars."""
        self.records.append(record)
        with open(os.path.join(self.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, record["epoch"])
            self._tb.flush()

    def write(self, final: dict[str, Any] | None = None) -> str:
        """Write ``results.json``, ``results.md`` and ``curves.png``; return the Markdown table."""
        payload = {"config": self.config, "epochs": self.records, "final": final}
        tmp = os.path.join(self.output_dir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, os.path.join(self.output_dir, "results.json"))
        table = markdown_table(self.records, final)
        with open(os.path.join(self.output_dir, "results.md"), "w") as f:
            f.write(f"# Results: {self.config.get('method', {}).get('name')} "
                    f"on {self.config.get('data', {}).get('name')}\n\n{table}\n")
        if self.plot and self.records:
            from .plots import plot_curves

            plot_curves(self.records, os.path.join(self.output_dir, "curves.png"))
        return table

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
