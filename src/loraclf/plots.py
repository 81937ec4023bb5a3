"""PNG figures of a run: the learning curve and the confusion matrix (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
from matplotlib.figure import Figure

from .runs import atomic_file

# Figures are drawn without pyplot: no backend is chosen or changed (a notebook's inline plots
# stay as they were: matplotlib.use("Agg") at import turned them off), nothing is kept in
# pyplot's list of open figures, and no display is needed (servers, CI).


def _save(fig: Figure, path: Path) -> None:
    """PNG, written atomically like every other file of a run."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def learning_curve(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Train loss per logged step and validation accuracy per epoch, on a shared step axis."""
    train = [r for r in records if r.get("event") == "train"]
    val = [r for r in records if r.get("event") == "eval" and r.get("split") == "validation"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        # one logged step (a run shorter than train.log_every_steps) is a point: a plain line drew nothing
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss",
                marker="o" if len(train) == 1 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["accuracy"] for r in val], "o-", color="tab:orange",
                 label="validation accuracy")
        ax2.set_ylabel("validation accuracy", color="tab:orange")
    ax.set_title("learning curve")
    fig.tight_layout()
    _save(fig, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: Path, title: str) -> None:
    """Rows: true class; columns: predicted class; cells: counts."""
    # Class names are plain text: matplotlib would read "$", "$$" (price tiers) as mathtext and fail.
    with matplotlib.rc_context({"text.parse_math": False}):
        _confusion_matrix(matrix, label_names, path, title)


# Beyond these the figure would grow with the square of the classes (1.2 inch a class: 100 classes
# took 4.8 GB and 31 s to draw, ~550 passed matplotlib's pixel limit): the side is capped, counts
# are written in the cells only while they are legible, names on the axes while they fit.
MAX_SIDE_INCHES = 24
MAX_CELL_COUNTS = 30
MAX_TICK_NAMES = 80


def _confusion_matrix(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: Path, title: str) -> None:
    n = len(label_names)
    side = min(1.2 * n + 2.5, MAX_SIDE_INCHES)
    fig = Figure(figsize=(side, min(1.2 * n + 2, MAX_SIDE_INCHES)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    peak = max((max(r) for r in matrix), default=0)
    if n <= MAX_CELL_COUNTS:
        for i in range(n):
            for j in range(n):
                v = matrix[i][j]
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    if n <= MAX_TICK_NAMES:
        size = None if n <= MAX_CELL_COUNTS else 6
        ax.set_xticks(range(n), label_names, rotation=45 if n <= MAX_CELL_COUNTS else 90, ha="right", fontsize=size)
        ax.set_yticks(range(n), label_names, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
