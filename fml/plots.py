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


def curves_figure(history: dict, *, title: str = "", loss_name: str | None = None, dpi: int = 150):
    """The learning-curve `matplotlib.figure.Figure` of `learning_curves`: one panel per
    quantity (loss, then accuracy or r2), epochs numbered as in the history's `epoch`
    list (and so in `history.csv`) on integer ticks, the loss named on its axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = [m for m in ("loss", "accuracy", "r2") if _series(history, m)]
    figure = Figure(figsize=(4.2 * len(metrics), 3.2), dpi=dpi)
    for i, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), i + 1)
        for label, values in _series(history, metric):
            epochs = list(history.get("epoch") or range(len(values)))[: len(values)]
            axes.plot(epochs, values, label=label, marker="." if len(values) < 30 else None)
        if metric in history.get("test", {}):
            axes.axhline(history["test"][metric], color="grey", linestyle=":", label="final test")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        named = metric == "loss" and loss_name
        axes.set_ylabel(f"loss ({loss_name.replace('_', ' ')})" if named else metric)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def learning_curves(
    history: dict, path, *, title: str = "", loss_name: str | None = None, dpi: int = 150
) -> pathlib.Path:
    """Plots loss and metric per epoch (train and validation) into a PNG at `path`.

    Args:
      history: a `fit` history: lists `train_loss`, `val_loss`, `train_accuracy`
        (or `_r2`)..., `epoch`, and optionally `test` (drawn as a line).
      path: where the PNG goes (written atomically).
      title: figure title.
      loss_name: the loss, named on its axis (e.g. "softmax_cross_entropy").
      dpi: resolution (150: a 4.2-inch panel is 630 pixels wide).

    Returns:
      the path written.
    """
    figure = curves_figure(history, title=title, loss_name=loss_name, dpi=dpi)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
    return pathlib.Path(path)
