"""What `fit` and `sweep` take as data: a `Dataset`, an `(x, y)` pair or a
stream, as `Splits`; its task; and the checks of the targets against the model."""

from typing import NamedTuple

import jax
import numpy as np

from fml import data as data_lib
from fml import losses as losses_lib
from fml import models as models_lib
from fml._model import Model
from fml.data import Dataset, as_array, check_arrays, check_labels
from fml.errors import ConfigError, ShapeError, in_range
from fml.step import Objective


class Splits(NamedTuple):
    """A run's data: training arrays (for a stream, its first examples, for checks
    and shapes), the held-out splits or None, the task, and the stream if any."""

    x: np.ndarray
    y: np.ndarray
    val: tuple | None
    test: tuple | None
    task: str
    stream: data_lib.BatchStream | None

    @property
    def num_examples(self) -> int:
        return len(self.stream.source) if self.stream else self.x.shape[0]


def task_of_targets(y) -> str:
    return "classification" if np.issubdtype(y.dtype, np.integer) else "regression"


def splits(data, validation=0.0) -> Splits:
    """The `Splits` of a `Dataset`, an `(x, y)` pair (cut by `validation`) or a stream."""
    if isinstance(data, data_lib.BatchStream):
        if validation:
            raise ConfigError("a BatchStream has no validation split; fit a Dataset for one")
        sample = data.source.read(np.arange(min(len(data.source), 1024)))
        return Splits(sample["x"], sample["y"], None, None, task_of_targets(sample["y"]), data)
    if isinstance(data, Dataset):
        if validation:
            raise ConfigError("pass validation= to fml.data.load for a Dataset, not to fit")
        val = (data.x_val, data.y_val) if data.x_val is not None else None
        test = (data.x_test, data.y_test) if data.x_test is not None else None
        return Splits(data.x_train, data.y_train, val, test, data.task, None)
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = as_array(data[0], "x", "training data"), as_array(data[1], "y", "training data")
        val = None
        if validation and x.ndim:
            in_range(validation, "validation fraction", 0.0, 1.0, closed="neither")
            cut = x.shape[0] - max(1, int(round(validation * x.shape[0])))
            x, val, y = x[:cut], (x[cut:], y[cut:]), y[:cut]
        return Splits(x, y, val, None, task_of_targets(y), None)
    raise ConfigError(
        f"expected data as an fml.data.Dataset, an (x, y) tuple or an fml.data.BatchStream, "
        f"got {type(data).__name__}"
    )


def _batch_shape(dims) -> str:
    return str(("N", *dims)).replace("'", "")


def check_targets(model: Model, params, x, y, objective: Objective, where: str) -> int | None:
    """Traces `apply` on one example (checking the input) and checks the targets'
    shape against the output's; returns the classifier's output width, or None."""
    out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
    outputs = tuple(out.shape[1:])
    if objective.classify:
        want = () if outputs == (1,) else outputs[:-1]
        if tuple(y.shape[1:]) != want:
            raise ShapeError(
                f"{where}: expected integer labels of shape {_batch_shape(want)} for "
                f"{model.family} outputs of shape {_batch_shape(outputs)}, got {y.shape}"
            )
        return outputs[-1]
    if tuple(y.shape[1:]) not in (outputs, () if outputs == (1,) else None):
        raise ShapeError(
            f"{where}: float targets mean regression, and the {model.family} outputs are "
            f"{_batch_shape(outputs)}, so expected y of shape {_batch_shape(outputs)}, got "
            f"{y.shape}; for classification pass integer labels"
        )
    return None


def check_data(model: Model, params, splits: Splits, objective: Objective, task: str) -> None:
    """Checks the training targets, then the held-out splits against them."""
    expected = check_targets(model, params, splits.x, splits.y, objective, "training data")
    if objective.classify:
        check_labels(splits.y, expected, where="training data")
    for name, held_out in (("validation data", splits.val), ("test data", splits.test)):
        if held_out is not None:
            xs, ys = held_out
            check_arrays(xs, ys, task=task, num_outputs=expected, where=name)
            if xs.shape[1:] != splits.x.shape[1:]:
                raise ShapeError(
                    f"{name}: expected x of shape (N, {splits.x.shape[1:]}), got {xs.shape}"
                )
            check_targets(model, params, xs, ys, objective, name)


def resolve_task(model: Model, loss, task, splits: Splits) -> str:
    """The run's task: given, else what the loss (or the family's default loss for
    these targets) says, else the targets'; a classification loss needs labels."""
    if task is not None and task not in losses_lib.TASKS:
        raise ConfigError(f"expected task in {list(losses_lib.TASKS)}, got {task!r}")
    loss = loss or models_lib.default_loss(model.spec, task or splits.task)
    task = task or losses_lib.task_of(loss, default=splits.task)
    if task == "classification" and splits.task == "regression":
        raise ConfigError(
            f"{model.family} with loss {getattr(loss, '__name__', loss)} is for classification "
            "and needs integer class labels, got float targets"
        )
    return task
