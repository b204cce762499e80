"""The report of ``python -m datkit.bench network``: C_wire and the ratios against ``none``, the Markdown table with
the performance goals (:data:`GOALS`, reached / not reached), and the plot of C per compressor per link rate.

The rows are those ``datkit.bench.network`` measured (one per hosts x rate x compressor; see its docstring for the
columns); everything here works on them alone, so ``--rerender`` redraws a finished bench from its JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from datkit.netemu.hosts import rate_bits

# The performance goals (issue 9), on 2 hosts at 100 Mbit/s: C(compressor) / C(none) at most this. They are this
# bench's business (reported as reached / not reached, next to the machine's plain s/step), never a test's: the
# compressors' codec is CPU work, so the ratio a machine reaches depends on its speed.
GOALS: dict[str, float] = {"int8-2s": 0.3, "onebit": 0.06, "onebit-adam": 0.06}
GOAL_HOSTS, GOAL_RATE = 2, "100mbit"


def add_ratios(rows: list[dict[str, Any]], steps: int) -> None:
    """C_wire and the ratios against ``none`` at the same hosts and rate (in place)."""
    for r in rows:
        if "C_s" in r and r.get("probe_bps"):
            r["C_wire_s"] = steps * r["bytes_per_iter"] * 8 / r["probe_bps"]
    for r in rows:
        ref = next((x for x in rows if x["hosts"] == r["hosts"] and x["rate"] == r["rate"]
                    and x["compressor"] == "none" and "C_s" in x), None)
        if ref is None or "C_s" not in r:
            continue
        for k, src in (("C_ratio", "C_s"), ("T_ratio", "T_s"), ("bytes_ratio", "bytes_per_iter"),
                       ("C_min_ratio", "C_min_s")):
            if src in r and src in ref:
                r[k] = r[src] / ref[src] if ref[src] else float("nan")


def goal_lines(rows: list[dict[str, Any]], setup: dict[str, Any]) -> list[str]:
    """One line per goal of :data:`GOALS` whose row was measured: reached / not reached, with the machine's speed."""
    lines = []
    for r in rows:
        goal = GOALS.get(r["compressor"])
        if goal is None or r["hosts"] != GOAL_HOSTS or r["rate"] != GOAL_RATE or r.get("C_ratio") is None:
            continue
        r["goal_C_ratio"], r["goal_reached"] = goal, r["C_ratio"] <= goal
        lines.append(f"- goal C({r['compressor']})/C(none) <= {goal} at {GOAL_HOSTS} hosts x {GOAL_RATE}: "
                     f"**{'reached' if r['goal_reached'] else 'not reached'}** (C ratio {r['C_ratio']:.3f}, "
                     f"C min ratio {r.get('C_min_ratio', float('nan')):.3f}, bytes ratio {r['bytes_ratio']:.3f})")
    if lines:
        step = setup.get("plain_step_s")
        lines.append(f"- this machine: plain PyTorch PGD-7 step of cnn_small, batch 128, one thread: "
                     f"{'-' if step is None else f'{step:.3f}'} s/step (`python -m datkit.bench step --threads 1`'s "
                     "plain column; the codec's share of C grows on a slower CPU)")
    return lines


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """The results table, then the goals (reached / not reached) with this machine's plain s/step."""
    head = ("| hosts | rate | link (Mbit/s, probed) | compressor | bytes/iter | C/epoch (s) | C_wire/epoch (s) | "
            "C_codec/epoch (s) | C min (s) | T/epoch (s) | C ratio | T ratio | bytes ratio | C min ratio |")
    lines = [f"`python -m datkit.bench network` — backend {setup['backend']}, {setup['steps']} steps/epoch, median "
             f"over epochs 2..{setup['epochs']}, 1 worker per host, job: {' '.join(setup['job'])}", "", head,
             "|" + "---|" * 14]
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else spec.format(v)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['hosts']} | {r['rate']} | {f(r.get('probe_bps', 0) / 1e6, '{:.0f}')} | "
                         f"{r['compressor']} | failed: {r['error']} ||||||||||")
            continue
        lines.append(f"| {r['hosts']} | {r['rate']} | {r['probe_bps'] / 1e6:.0f} | {r['compressor']} | "
                     f"{r['bytes_per_iter']:,.0f} | {r['C_s']:.3f} | {f(r.get('C_wire_s'), '{:.3f}')} | "
                     f"{f(r.get('C_codec_s'), '{:.3f}')} | {f(r.get('C_min_s'), '{:.3f}')} | "
                     f"{r['T_s']:.3f} | {f(r.get('C_ratio'), '{:.3f}')} | {f(r.get('T_ratio'), '{:.3f}')} | "
                     f"{f(r.get('bytes_ratio'), '{:.3f}')} | {f(r.get('C_min_ratio'), '{:.3f}')} |")
    goals = goal_lines(rows, setup)
    return "\n".join(lines + ([""] + goals if goals else [])) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """C per epoch per compressor, grouped by rate, one panel per number of hosts (log scale); a black dash
    marks C_wire, the time the bytes alone need at the probed link rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "C_s" in r]
    hosts = sorted({r["hosts"] for r in ok})
    if not hosts:
        return
    comps = list(dict.fromkeys(r["compressor"] for r in ok))
    fig, axes = plt.subplots(1, len(hosts), figsize=(5.5 * len(hosts), 4), squeeze=False)
    for ax, h in zip(axes[0], hosts):
        rates = sorted({r["rate"] for r in ok if r["hosts"] == h}, key=rate_bits)
        width = 0.8 / max(1, len(comps))
        for j, c in enumerate(comps):
            vals = [next((r["C_s"] for r in ok if r["hosts"] == h and r["rate"] == rt and r["compressor"] == c), 0)
                    for rt in rates]
            xs = [i + j * width for i in range(len(rates))]
            ax.bar(xs, [max(v, 1e-4) for v in vals], width, label=c)
            wire = [next((r.get("C_wire_s") for r in ok
                          if r["hosts"] == h and r["rate"] == rt and r["compressor"] == c), None) for rt in rates]
            ax.scatter([x for x, w in zip(xs, wire) if w], [w for w in wire if w], marker="_", s=200, color="black",
                       label="C_wire (bytes at the probed rate)" if j == 0 else None, zorder=3)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rates))], rates)
        ax.set_yscale("log")
        ax.set_title(f"{h} emulated hosts")
        ax.set_ylabel("C per epoch (s)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["GOALS", "GOAL_HOSTS", "GOAL_RATE", "add_ratios", "goal_lines", "markdown", "plot"]
