"""Learning curves as a PNG: training loss, and TA / RA per epoch."""
from __future__ import annotations

from typing import Any


def plot_curves(records: list[dict[str, Any]], path: str) -> None:
    """Two panels: train loss; TA, RA and (certified training) VA (evaluated epochs only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key in ("TA", "RA", "VA"):
        pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=key)
    ax2.set(xlabel="epoch", ylabel="accuracy", title="test accuracy", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
