"""Learning-curve plots (matplotlib, Agg backend: no display needed)."""

import io
import pathlib

from fml.rundir import atomic_write


def _series(history: dict, metric: str) -> list[tuple[str, list]]:
    """The (label, values) pairs of `history` for `metric`: train, then validation."""
    return [
        (label, history[f"{split}_{metric}"])
        for split, label in (("train", "train"), ("val", "validation"))
        if history.get(f"{split}_{metric}")
    ]


def learning_curves(history: dict, path, *, title: str = "") -> pathlib.Path:
    """Plots loss and metric per epoch (train and validation) into a PNG at `path`.

    Args:
      history: a `fit` history: lists `train_loss`, `val_loss`, `train_accuracy`
        (or `_r2`)..., and optionally `test` (shown in the title).
      path: where the PNG goes (written atomically).
      title: figure title.

    Returns:
      the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    metrics = [m for m in ("loss", "accuracy", "r2") if _series(history, m)]
    figure = Figure(figsize=(4.2 * len(metrics), 3.2), dpi=80)
    for i, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), i + 1)
        for label, values in _series(history, metric):
            epochs = range(1, len(values) + 1)
            axes.plot(epochs, values, label=label, marker="." if len(values) < 30 else None)
        if metric in history.get("test", {}):
            axes.axhline(history["test"][metric], color="grey", linestyle=":", label="final test")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
    return pathlib.Path(path)
