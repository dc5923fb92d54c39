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
    _save(fig, path)
    return Path(path)


def plot_weight_trajectories(histories: dict[str, dict], path: str | Path, title: str | None = None) -> Path:
    """One panel per method: the weight of each task at every recorded step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(histories)
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps = histories[name]["steps"]
        for task in histories[name]["tasks"]:
            ax.plot([s["step"] for s in steps], [s["weights"][task] for s in steps], label=task)
        ax.set(title=name, xlabel="step", ylabel="task weight")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
