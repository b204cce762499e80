"""Results of a randomized-smoothing certification: ``certify.tsv``, the certified-accuracy table
(Markdown), ``certify.png`` and the ``certify`` entry of ``results.json``.

Certified accuracy at radius r (Cohen et al. 2019, as in the DAT paper's Table 2): the fraction of test
examples that ``certify`` classifies correctly with a certified l2 radius >= r (abstentions count as
wrong). ACR is the average certified radius, with 0 for wrong or abstained examples (Zhai et al. 2020).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

# One row per test example, in index order (Cohen et al.'s certify.tsv columns; time in seconds).
COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "radius", "correct", "time")
Row = dict[str, Any]


def certified_accuracy(rows: Sequence[Row], radii: Sequence[float]) -> list[float]:
    """For each radius r, the fraction of rows with ``correct`` and ``radius >= r``."""
    n = max(1, len(rows))
    return [sum(1 for r in rows if r["correct"] and r["radius"] >= radius) / n for radius in radii]


def summary(rows: Sequence[Row], radii: Sequence[float]) -> dict[str, Any]:
    """Certified accuracy per radius (keys ``f"{r:g}"``), ACR, abstention rate and mean seconds per example."""
    n = max(1, len(rows))
    return {"certified_accuracy": {f"{r:g}": a for r, a in zip(radii, certified_accuracy(rows, radii))},
            "ACR": sum(r["radius"] for r in rows if r["correct"]) / n,
            "abstain_rate": sum(1 for r in rows if r["predict"] < 0) / n,
            "seconds_per_example": sum(r["time"] for r in rows) / n}


def write_tsv(rows: Sequence[Row], path: str) -> None:
    """``certify.tsv``: a header and one tab-separated row per example (predict -1 = abstain)."""
    with open(path, "w") as f:
        f.write("\t".join(COLUMNS) + "\n")
        for r in rows:
            f.write(f"{r['idx']}\t{r['label']}\t{r['predict']}\t{r['radius']:.6f}\t{int(r['correct'])}\t{r['time']:.4f}\n")


def markdown(res: dict[str, Any]) -> str:
    """The certified-accuracy table (one column per radius) and the settings it was measured with."""
    acc = res["certified_accuracy"]
    head = "| sigma | n images | " + " | ".join(f"r={k}" for k in acc) + " | ACR |"
    row = (f"| {res['sigma']:g} | {res['num_examples']} | " + " | ".join(f"{v:.3f}" for v in acc.values())
           + f" | {res['ACR']:.3f} |")
    return "\n".join([
        f"Certified accuracy (l2) of the smoothed {res['model']} from {res['checkpoint']} (epoch {res['epoch']}, "
        f"trained with {res['trained_with']}) on {res['test_set']}:", "",
        head, "|---|---|" + "---|" * len(acc) + "---|", row, "",
        f"Cohen et al.'s CERTIFY with n0={res['n0']}, n={res['n']}, alpha={res['alpha']:g}, "
        f"noise batch {res['batch_size']}, "
        f"seed {res['seed']}; abstained on {res['abstain_rate']:.1%}; {res['seconds_per_example']:.2f} s per image, "
        f"{res['time_s']:.1f} s in all on {res['world_size']} worker(s) (backend {res['backend']})."])


def plot(rows: Sequence[Row], radii: Sequence[float], sigma: float, path: str) -> None:
    """``certify.png``: certified accuracy as a function of the radius, the table's radii marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([r["radius"] for r in rows] + list(radii) + [1e-3]) * 1.05
    grid = [top * i / 400 for i in range(401)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid, certified_accuracy(rows, grid), label=f"sigma = {sigma:g}")
    ax.plot(list(radii), certified_accuracy(rows, radii), "o", ms=4, label="table radii")
    ax.set(xlabel="l2 radius", ylabel="certified accuracy", ylim=(0, 1), xlim=(0, top),
           title=f"randomized smoothing ({len(rows)} test images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_results_json(path: str, record: dict[str, Any]) -> None:
    """Set ``record`` as the ``certify`` entry of ``path`` and keep every other entry (e.g. a training run's);
    a file that is not a JSON object is kept as ``path.bak``."""
    payload: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError):
            payload = None
        if not isinstance(payload, dict):  # not ours to overwrite: keep it next to the new file
            os.replace(path, path + ".bak")
            payload = {}
    payload["certify"] = record
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
