"""Plots of a training history and of learned features (matplotlib, saved as PNG, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

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
    for loss in history.get("losses", history["tasks"]):
        ax_weight.plot(epochs, [r["weights"].get(loss) for r in history["epochs"]], marker="o", label=loss)
    ax_metric.set(xlabel="epoch", ylabel=f"test {metric} (%)", title="per-task test " + metric)
    ax_weight.set(xlabel="epoch", ylabel="mean task weight", title="task weights")
    for ax in (ax_metric, ax_weight):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
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
        for loss in histories[name].get("losses", histories[name]["tasks"]):
            ax.plot([s["step"] for s in steps], [s["weights"][loss] for s in steps], label=loss)
        ax.set(title=name, xlabel="step", ylabel="task weight")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def plot_feature_projection(panels: dict[str, dict[str, torch.Tensor]], path: str | Path,
                            title: str | None = None) -> Path:
    """One panel per entry: groups of feature vectors (e.g. source and target) projected to 2-D.

    Each panel is projected on the first two principal components of its own pooled
    features, so a panel shows how far apart its groups lie in that model's feature space.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (name, groups) in zip(axes.flat, panels.items()):
        pooled = torch.cat([g.flatten(1).double() for g in groups.values()])
        centred = pooled - pooled.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        start = 0
        for label, g in groups.items():
            xy = centred[start:start + len(g)] @ v[:2].T
            start += len(g)
            ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), s=4, alpha=0.5, label=label)
        ax.set(title=name, xticks=[], yticks=[])
        ax.legend(markerscale=3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
