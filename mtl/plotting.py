"""Plots of a training history (matplotlib, saved as PNG, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

from .io import atomic_write


def plot_history(history: dict, path: str | Path, metric: str = "accuracy", title: str | None = None) -> Path:
    """Two panels over epochs: each task's evaluation ``metric``, and the weight each task got."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history["epochs"]]
    fig, (ax_metric, ax_weight) = plt.subplots(1, 2, figsize=(10, 4))
    for task in history["tasks"]:
        values = [r.get("eval", {}).get(task, {}).get(metric) for r in history["epochs"]]
        if any(v is not None for v in values):
            ax_metric.plot(epochs, [100 * v if v is not None else None for v in values], marker="o", label=task)
        ax_weight.plot(epochs, [r["weights"].get(task) for r in history["epochs"]], marker="o", label=task)
    ax_metric.set(xlabel="epoch", ylabel=f"test {metric} (%)", title="per-task test " + metric)
    ax_weight.set(xlabel="epoch", ylabel="mean task weight", title="task weights")
    for ax in (ax_metric, ax_weight):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return Path(path)
