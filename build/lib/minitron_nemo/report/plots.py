"""PNG plots people look at: importance heat maps, depth scores, parameter counts, curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402


def heatmap(scores_ln, title: str, xlabel: str, path: Path) -> Path:
    """Layers x units heat map (each layer normalised to its max, so layers compare);
    `scores_ln` is any 2-D array (a torch tensor included)."""
    data = numpy.asarray(scores_ln, dtype=numpy.float64)
    data = data / numpy.maximum(data.max(axis=1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * data.shape[0] + 1.5)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="importance / layer max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def depth_scores(
    block_importance: list[float],
    skip_loss: list[float] | None,
    base_loss: float | None,
    block_loss: dict[int, list[float]] | None,
    dropped: list[int],
    path: Path,
) -> Path:
    """Per-layer block importance and skip-loss increase, block losses, dropped layers marked."""
    panels = 1 + (skip_loss is not None) + bool(block_loss)
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3 * panels), squeeze=False)
    layers = list(range(len(block_importance)))
    ax = axes[0][0]
    colors = ["tab:red" if i in dropped else "tab:blue" for i in layers]
    ax.bar(layers, block_importance, color=colors)
    ax.set_title("block importance 1 - cos(x_in, x_out) per layer (red: dropped)")
    ax.set_xlabel("layer")
    row = 1
    if skip_loss is not None:
        ax = axes[row][0]
        increase = [loss - (base_loss or 0.0) for loss in skip_loss]
        ax.bar(layers, increase, color=colors)
        ax.set_title(f"LM loss increase when the layer is skipped (base {base_loss:.3f})")
        ax.set_xlabel("layer")
        row += 1
    if block_loss:
        ax = axes[row][0]
        for k, losses in sorted(block_loss.items()):
            ax.plot(range(len(losses)), losses, marker="o", label=f"block of {k}")
        if base_loss is not None:
            ax.axhline(base_loss, color="gray", linestyle="--", label="no layer skipped")
        ax.set_title("LM loss with the contiguous block [start, start+k) skipped")
        ax.set_xlabel("block start")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def param_counts(before: dict[str, int], after: dict[str, int], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = list(before)
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [before[k] / 1e6 for k in keys], width=0.4, label="source")
    ax.bar([i + 0.2 for i in x], [after[k] / 1e6 for k in keys], width=0.4, label="pruned")
    ax.set_xticks(list(x), keys)
    ax.set_ylabel("parameters (M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(
    series: dict[str, tuple[list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: Path,
) -> Path:
    """Several (x, y) curves on one plot (e.g. KD loss vs scratch loss)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
