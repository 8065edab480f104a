"""Figures of the reports: the global explanation (specs/qpm.md §8: feature heatmaps and class comparisons)
and the comparison of methods (accuracy against interpretability, recovery against chance).

A heatmap is a selected feature's map, upsampled to the image, min-max normalised per image, gamma-
saturated (γ = 3) and used as the opacity of the column's colour over the grey-scale image.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

COLOURS = np.array([
    [0.85, 0.10, 0.10], [0.10, 0.60, 0.10], [0.10, 0.25, 0.85], [0.90, 0.75, 0.05], [0.80, 0.10, 0.80],
    [0.95, 0.50, 0.05], [0.50, 0.05, 0.05], [0.40, 0.25, 0.10], [0.05, 0.65, 0.70], [0.60, 0.45, 0.15],
])


def denormalise(image: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """CHW normalised tensor -> HWC float image in [0, 1]."""
    img = image.detach().cpu().float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def heatmap_overlay(image: np.ndarray, feature_map: torch.Tensor, colour: np.ndarray, gamma: float = 3.0
                    ) -> np.ndarray:
    """Blend one feature map (h x w) over `image` (H x W x 3) in `colour`.

    The map is upsampled, min-max normalised and gamma-saturated, then used as the opacity of `colour` over
    a lightened grey-scale copy of the image, so only where the feature fires strongly is coloured.
    """
    h, w = image.shape[:2]
    m = feature_map.detach().float()[None, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
    alpha = 0.85 * m[..., None] ** gamma
    grey = 0.4 + 0.6 * image.mean(axis=2, keepdims=True).repeat(3, axis=2)
    return np.clip(grey * (1 - alpha) + colour[None, None, :] * alpha, 0, 1)


def class_strip(path: Path, title: str, image: np.ndarray, maps: torch.Tensor, features: list[int],
                feature_labels: list[str]) -> None:
    """One image followed by the heatmaps of a class's features (columns coloured per feature)."""
    cols = 1 + len(features)
    fig, axes = plt.subplots(1, cols, figsize=(1.9 * cols, 2.2))
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=8)
    for i, (j, label) in enumerate(zip(features, feature_labels), start=1):
        axes[i].imshow(heatmap_overlay(image, maps[j], COLOURS[i % len(COLOURS)]))
        axes[i].set_title(label, fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def comparison_figure(path: Path, names: tuple[str, str], images: tuple[np.ndarray, np.ndarray],
                      maps: tuple[torch.Tensor, torch.Tensor], columns: list[int], column_labels: list[str],
                      ownership: list[str]) -> None:
    """Two classes (rows) x their features (columns: only class 1, shared, only class 2), as in §8."""
    cols = 1 + len(columns)
    fig, axes = plt.subplots(2, cols, figsize=(1.9 * cols, 4.2))
    for r in range(2):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_ylabel(names[r], fontsize=8)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        for i, j in enumerate(columns, start=1):
            axes[r, i].imshow(heatmap_overlay(images[r], maps[r][j], COLOURS[i % len(COLOURS)]))
            axes[r, i].axis("off")
            if r == 0:
                axes[r, i].set_title(f"{column_labels[i - 1]}\n({ownership[i - 1]})", fontsize=7)
    axes[0, 0].set_title("image", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save(fig, target: Path | BinaryIO) -> None:
    """Write `fig` as a PNG (a path or a binary file object) and release it."""
    fig.savefig(target, dpi=90, format="png")
    plt.close(fig)


def _mark_colour(i: int) -> np.ndarray:
    return COLOURS[i % len(COLOURS)]


def accuracy_scatter(models: list[tuple[str, dict]], keys: list[str], titles: list[str]):
    """One panel per metric in `keys`: each model a mark at (its metric, its top-1 accuracy), labelled."""
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax, key, title in zip(axes.flat, keys, titles):
        for i, (label, metrics) in enumerate(models):
            x, y = metrics.get(key), metrics.get("accuracy")
            if x is None or y is None:
                continue
            ax.scatter([x], [y], s=40, color=_mark_colour(i), zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(title, fontsize=8)
        ax.set_ylabel("top-1 accuracy (%)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.margins(0.2)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("Accuracy against each interpretability metric (one mark per model)", fontsize=9)
    fig.tight_layout()
    return fig


def baseline_bars(models: list[tuple[str, dict]], pairs: list[tuple[str, str]], titles: list[str]):
    """One panel per (metric, baseline) pair: per model, its score beside what chance gives for it."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(3.4, 0.9 * len(models) + 1.5) * len(pairs), 3.0),
                             squeeze=False)
    for ax, (key, baseline), title in zip(axes.flat, pairs, titles):
        shown = [(label, m[key], m.get(baseline)) for label, m in models if m.get(key) is not None]
        x = np.arange(len(shown))
        ax.bar(x - 0.2, [v for _, v, _ in shown], width=0.4, color=COLOURS[2], label="model")
        ax.bar(x + 0.2, [b if b is not None else 0.0 for _, _, b in shown], width=0.4, color="0.7", label="chance")
        ax.set_xticks(x, [label for label, _, _ in shown], fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle("Ground-truth recovery against chance", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return fig
