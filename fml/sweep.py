"""Sweeps: many configurations of one model trained as one compiled program.

K configurations (seeds, learning rates, SVM `C`, L2 strengths, any injected
optimizer hyperparameter) are stacked along a leading axis of a single
`TrainState`: params, optimizer states and keys are `[K, ...]`, and the
per-run values are arrays (`opt_state.hyperparams["learning_rate"]` `[K]`,
`hparams["l2"]` `[K]`). `fml.train.make_train_step` is `jax.vmap`ped over that
axis and jitted once, so a sweep compiles its step (or fused epoch) once,
whatever the values. The training data is shared by all members; each member
shuffles it with its own seed's key, so member `k` sees exactly the batches
`fit(seed=seed_k)` would.
"""

import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fml import batching, inputs, rundir
from fml import metrics as metrics_lib
from fml import models as models_lib
from fml import step as step_lib
from fml._model import Model
from fml.data import check_arrays
from fml.errors import ConfigError, ShapeError, TrainingError
from fml.inference import predict

# Swept values that are not optimizer hyperparameters.
MODEL_AXES = ("seed", "C", "l2")


# ------------------------------------------------------------------ configurations


def _as_values(name: str, value) -> list:
    values = list(value) if isinstance(value, list | tuple | range | np.ndarray) else [value]
    if not values:
        raise ConfigError(f"expected at least one value for {name}, got an empty list")
    return values


def grid(**axes) -> list[dict]:
    """The Cartesian product of `axes` as a list of configurations, first axis slowest.

    Example:
      >>> grid(seed=[0, 1], learning_rate=[1e-3, 1e-2])[1]
      {'seed': 0, 'learning_rate': 0.01}
    """
    names = list(axes)
    values = [_as_values(n, axes[n]) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _seed_list(seeds) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"expected seeds >= 1 (a count) or a list of seeds, got {seeds}")
        return list(range(seeds))
    values = _as_values("seeds", seeds)
    if not all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in values):
        raise ConfigError(f"expected integer seeds, got {values}")
    return [int(s) for s in values]


def _complete(configs: list[dict], model: Model, tx) -> list[dict]:
    """Checks every configuration and gives all of them the same keys (an optimizer
    hyperparameter one config leaves out takes the optimizer's value)."""
    opt_state = tx.init({"w": jnp.zeros((1,), jnp.float32)})
    names = {n for c in configs for n in c if n not in MODEL_AXES}
    unknown_names = {n for n in names if optax.tree_utils.tree_get(opt_state, n) is None}
    if unknown_names:
        raise ConfigError(
            f"cannot sweep {sorted(unknown_names)}: expected seed, C (svm), l2 or a "
            "hyperparameter the optimizer holds in its state (e.g. learning_rate, "
            "weight_decay for adamw)"
        )
    first = {n: float(optax.tree_utils.tree_get(opt_state, n)) for n in sorted(names)}
    complete = []
    for config in configs:
        config = {**config, **{n: v for n, v in first.items() if n not in config}}
        if "C" in config and model.family != "svm":
            raise ConfigError(f"C is the SVM's regularisation; got C for a {model.family} model")
        if "C" in config and "l2" in config:
            raise ConfigError("sweep either C or l2 for an SVM (C sets l2 = 1 / (C n)), not both")
        seed = config["seed"]
        if (
            isinstance(seed, bool)
            or not isinstance(seed, int | np.integer)
            or not 0 <= seed < 2**31
        ):
            raise ConfigError(f"expected an integer seed in [0, 2**31), got {seed!r}")
        for name, value in config.items():
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise ConfigError(f"expected a number for {name}, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"expected a finite {name}, got {value}")
        if config["learning_rate"] <= 0 or config.get("C", 1.0) <= 0:
            raise ConfigError(f"expected learning_rate > 0 and C > 0, got {config}")
        complete.append(config)
    return complete


# ------------------------------------------------------------------ result


@dataclasses.dataclass
class SweepResult:
    """K trained members and their scores.

    Attributes:
      model: the swept model (member `k`'s own model is `member_model(k)`).
      configs: one dict per member (`seed`, `learning_rate`, ...).
      state: the stacked `TrainState`, every leaf `[K, ...]`.
      table: one row per member: its configuration, final train loss, validation
        and test loss and metric, and whether it diverged.
      metric: the metric name ("accuracy" or "r2"); higher is better.
      best: index of the member selected on validation metric (on final training
        loss when the data has no validation split).
      selected_on: "val_<metric>" or "train_loss".
      history: per-epoch `[epochs, K]` arrays: "train_loss", "train_<metric>".
      compiles: XLA compilations of the sweep's step / epoch function.
    """

    model: Model
    configs: list[dict]
    state: step_lib.TrainState
    table: list[dict]
    metric: str
    best: int
    selected_on: str
    history: dict
    compiles: int
    loss: str | None
    task: str
    splits: dict  # "val" / "test": (x, y), for ensembles
    input_shape: tuple

    def __len__(self) -> int:
        return len(self.configs)

    def member_state(self, k: int) -> step_lib.TrainState:
        """Member `k` as an ordinary single-model `TrainState`."""
        if not -len(self) <= k < len(self):
            raise ConfigError(f"expected a member index in [0, {len(self)}), got {k}")
        return _take(self.state, k)

    def member_model(self, k: int) -> Model:
        """Member `k`'s model; for an SVM with C swept, its spec carries that C."""
        if "C" in self.configs[k]:
            return models_lib.from_spec({**self.model.spec, "C": float(self.configs[k]["C"])})
        return self.model

    @property
    def best_state(self) -> step_lib.TrainState:
        return self.member_state(self.best)

    @property
    def best_params(self):
        return self.best_state.params

    @property
    def best_model(self) -> Model:
        return self.member_model(self.best)

    @property
    def best_config(self) -> dict:
        return self.configs[self.best]

    def predict(self, x, members: Sequence[int] | None = None) -> np.ndarray:
        """Every member's outputs on `x`: `[N, K, outputs]` (or the chosen members)."""
        params = self._params(members)
        return predict(_stacked(self.model), params, x)

    def ensemble_predict(self, x, members: Sequence[int] | None = None) -> np.ndarray:
        """The ensemble's outputs `[N, outputs]`: log of the mean class probabilities
        for classifiers with probabilities, else the mean output (SVM scores, regression)."""
        return np.asarray(_average(self.predict(x, members), self._loss_name()))

    def ensemble(self, members: Sequence[int] | None = None) -> dict:
        """The ensemble of `members` (all by default) against its members.

        Returns:
          `{"size": K, "val" / "test": {"loss", metric}, "members_val" / "members_test":
          {"mean", "std", "min", "max"} of the members' metric}` for the splits the data has.
        """
        chosen = list(range(len(self))) if members is None else list(members)
        report = {"size": len(chosen), "metric": self.metric}
        objective = step_lib.make_objective(self.model, self.loss, self.task)
        for split, (x, y) in self.splits.items():
            outputs = self.predict(x, chosen)
            ensemble_outputs = _average(outputs, self._loss_name())
            report[split] = _scores(objective, self.metric, ensemble_outputs[:, None], y)
            report[split] = {k: float(v[0]) for k, v in report[split].items()}
            member = np.asarray([self.table[k][f"{split}_{self.metric}"] for k in chosen])
            report[f"members_{split}"] = {
                "mean": float(member.mean()),
                "std": float(member.std()),
                "min": float(member.min()),
                "max": float(member.max()),
            }
        return report

    def _params(self, members):
        if members is None:
            return self.state.params
        index = np.asarray(list(members), np.int32)
        return _take(self.state.params, index)

    def _loss_name(self) -> str:
        return self.loss or models_lib.default_loss(self.model.spec, self.task)

    def markdown(self) -> str:
        """The table as markdown, the selected member marked with `*`."""
        columns = list(self.table[0])
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for row in self.table:
            cells = [_format(row[c]) for c in columns]
            if row["index"] == self.best:
                cells[0] += " *"
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(self.table[0]))
        writer.writeheader()
        writer.writerows(self.table)
        return out.getvalue()

    def save(
        self, run_dir, *, config: dict | None = None, preprocessing: dict | None = None
    ) -> pathlib.Path:
        """Writes the best member as a run directory (`fml.rundir` layout, with the
        data set's `preprocessing` when given) plus `table.md`, `table.csv`,
        `sweep.json` and the plot `sweep.png`."""
        run_dir = pathlib.Path(run_dir)
        best = self.best_config
        history = {
            "epoch": list(range(len(self.history["train_loss"]))),
            **{k: [float(v) for v in np.asarray(a)[:, self.best]] for k, a in self.history.items()},
        }
        if "test" in self.splits:
            history["test"] = {
                "loss": self.table[self.best]["test_loss"],
                self.metric: self.table[self.best][f"test_{self.metric}"],
            }
        run_config = {
            **(config or {}),
            **{k: v for k, v in best.items() if k != "C"},
            "input_shape": list(self.input_shape),
            "task": self.task,
            "sweep": {"members": len(self), "best": self.best, "selected_on": self.selected_on},
        }
        rundir.save_run(
            run_dir,
            model=self.best_model,
            params=self.best_params,
            config=run_config,
            history=history,
            preprocessing=preprocessing,
        )
        rundir.atomic_write(run_dir / "table.md", (self.markdown() + "\n").encode())
        rundir.atomic_write(run_dir / "table.csv", self.csv().encode())
        rundir.atomic_write(
            run_dir / "sweep.json",
            json.dumps({"best": self.best, "table": self.table}, indent=2, default=float).encode(),
        )
        plot(self, run_dir / "sweep.png")
        return run_dir


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot(result: SweepResult, path) -> pathlib.Path:
    """Saves the selection metric against each swept hyperparameter (log x axis),
    one point per member, the mean over the other axes as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = result.selected_on
    axes_names = [n for n in result.configs[0] if len({c[n] for c in result.configs}) > 1]
    axes_names = [n for n in axes_names if n != "seed"] or ["seed"]
    fig, axes = plt.subplots(
        1, len(axes_names), figsize=(4.5 * len(axes_names), 3.5), squeeze=False
    )
    for ax, name in zip(axes[0], axes_names):
        xs = np.asarray([row[name] for row in result.table], float)
        ys = np.asarray([row[score] for row in result.table], float)
        ax.scatter(xs, ys, alpha=0.6, label="member")
        ax.scatter(xs[result.best], ys[result.best], marker="*", s=200, color="C3", label="best")
        levels = np.unique(xs)
        ax.plot(levels, [np.nanmean(ys[xs == v]) for v in levels], "-o", color="C1", label="mean")
        if name != "seed" and levels.min() > 0:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(score)
        ax.legend()
    fig.suptitle(f"{result.model.family}: {len(result)} members, best #{result.best}")
    fig.tight_layout()
    path = pathlib.Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    rundir.atomic_write(path, buffer.getvalue())
    return path


# ------------------------------------------------------------------ stacked evaluation


@functools.lru_cache(maxsize=64)
def _members_apply(apply):
    return jax.vmap(apply, in_axes=(0, None), out_axes=1)


def _stacked(model: Model) -> Model:
    """`model` with `apply` mapped over stacked params: outputs `[B, K, ...]`."""
    return Model(model.init, _members_apply(model.apply), model.spec)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scores(objective, metric: str, outputs_NxKxO, y) -> dict:
    """Per-member loss and metric `{"loss": [K], metric: [K]}` of stacked outputs."""

    def member(outputs):
        return {
            "loss": jnp.mean(objective.loss(outputs, y)),
            metric: metrics_lib.get(metric)(outputs, y),
        }

    return jax.vmap(member, in_axes=1)(outputs_NxKxO)


@functools.partial(jax.jit, static_argnums=1)
def _average(outputs_NxKxO, loss_name: str):
    """Combines member outputs `[N, K, O]` into ensemble outputs `[N, O]`."""
    if loss_name == "softmax_cross_entropy":
        return jnp.log(jnp.mean(jax.nn.softmax(outputs_NxKxO, axis=-1), axis=1))
    if loss_name == "sigmoid_cross_entropy":
        probability = jnp.mean(jax.nn.sigmoid(outputs_NxKxO), axis=1)
        return jnp.log(probability) - jnp.log1p(-probability)
    return jnp.mean(outputs_NxKxO, axis=1)


# ------------------------------------------------------------------ training


def _member_means(step_metrics_KxS) -> dict:
    """Example-weighted means over the steps of each member's metrics: `{name: [K]}`."""
    counts = np.asarray(step_metrics_KxS["count"])
    total = np.maximum(counts.sum(1), 1.0)
    return {
        k: (np.asarray(v) * counts).sum(1) / total
        for k, v in step_metrics_KxS.items()
        if k != "count"
    }


@jax.jit
def _shuffle_keys(seeds_K, epoch):
    """Each member's epoch key (`fml.batching.epoch_key`), as `fit` draws it."""
    return jax.vmap(lambda s: batching.epoch_key(s, epoch))(seeds_K)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _member_epoch_indices(keys, num_examples, batch_size, drop_remainder):
    """`epoch_indices` of one key `[S, B]`, or of each member's key `[S, K, B]`."""
    indices = functools.partial(
        batching.epoch_indices,
        num_examples=num_examples,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
    )
    if keys.ndim == 0:
        return indices(keys)
    index_KxSxB, mask_KxSxB = jax.vmap(indices)(keys)
    return jnp.moveaxis(index_KxSxB, 1, 0), jnp.moveaxis(mask_KxSxB, 1, 0)


def _is_key(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _stack(trees: list):
    """Stacks pytrees along a new leading axis (on the host: no compilation)."""

    def stack(*leaves):
        if _is_key(leaves[0]):
            return jax.random.wrap_key_data(np.stack([jax.random.key_data(k) for k in leaves]))
        return jax.device_put(np.stack(jax.device_get(leaves)))

    return jax.tree.map(stack, *trees)


def _take(tree, index):
    """Member(s) `index` of a stacked pytree (on the host: no compilation)."""

    def take(leaf):
        if _is_key(leaf):
            return jax.random.wrap_key_data(np.asarray(jax.random.key_data(leaf))[index])
        return jax.device_put(np.asarray(leaf)[index])

    return jax.tree.map(take, tree)


def _host_epoch(step, state, x, y, keys, batch_size, drop_remainder):
    """One epoch of the vmapped step fed from host arrays. With one key (all members
    share a seed) the batch is shared `[B, ...]`, else it is per member `[K, B, ...]`."""
    index, mask = jax.device_get(
        _member_epoch_indices(keys, x.shape[0], batch_size, drop_remainder)
    )
    per_step = []
    for index_B, mask_B in zip(index, mask):
        state, metrics = step(state, {"x": x[index_B], "y": y[index_B], "mask": mask_B})
        per_step.append(metrics)
    return state, jax.tree.map(lambda *v: np.stack(v, axis=1), *jax.device_get(per_step))


def _init_states(model, tx, input_shape, configs, l2_values):
    """The stacked `TrainState` of all members, each made by `init_state` exactly as
    `fit` makes it alone (its eager ops are compiled once and shared with `fit`)."""
    states, by_seed = [], {}
    for config, l2 in zip(configs, l2_values):
        if config["seed"] not in by_seed:  # members of one seed start alike
            by_seed[config["seed"]] = step_lib.init_state(
                model, tx, input_shape, seed=config["seed"]
            )
        state = by_seed[config["seed"]]
        state = state._replace(hparams={**state.hparams, "l2": np.asarray(l2, np.float32)})
        hyperparams = {
            n: np.asarray(v, np.float32) for n, v in config.items() if n not in MODEL_AXES
        }
        opt_state = optax.tree_utils.tree_set(state.opt_state, **hyperparams)
        states.append(state._replace(opt_state=opt_state))
    return _stack(states)


def sweep(
    model: Model,
    data,
    *,
    seeds=1,
    learning_rate=1e-3,
    C=None,
    l2=None,
    configs: Sequence[dict] | None = None,
    optimizer="adam",
    epochs: int = 10,
    batch_size: int = 32,
    loss=None,
    metric=None,
    validation: float = 0.0,
    fused: bool = False,
    drop_remainder: bool = False,
    clip_norm: float | None = None,
    optimizer_kwargs: dict | None = None,
    subsets: Sequence | None = None,
    **optimizer_hyperparams,
) -> SweepResult:
    """Trains every configuration of a grid (or a list) as one vmapped program.

    Each member ends with the params `fml.fit` would give that configuration
    alone (same init, same batches, same dropout keys), up to float rounding.

    Args:
      model: a `Model`.
      data: an `fml.data.Dataset` (load it with `validation=` to select on a
        validation split) or an `(x, y)` pair.
      seeds: a count (`5` is seeds 0..4) or a list of seeds.
      learning_rate: a float or a list of floats.
      C: the SVM's C, a float or list (each sets `l2 = 1 / (C n)`); SVM only.
      l2: L2 coefficient(s) of `0.5 * sum(w²)`; by default the family's.
      configs: instead of the grid, a list of dicts with keys among `seed`,
        `learning_rate`, `C`, `l2` and optimizer hyperparameters; missing keys
        take the arguments' (first) values.
      optimizer: a name in `fml.train.OPTIMIZERS` (not lbfgs).
      epochs, batch_size, loss, metric, validation, fused, drop_remainder,
        clip_norm, optimizer_kwargs: as in `fml.fit`.
      subsets: one array of training-example indices per member, in the members'
        order (a `configs` list's, or the grid's): member `k` trains on
        `x[subsets[k]], y[subsets[k]]` exactly as `fml.fit` would on those examples
        alone (its batches, its l2 default), e.g. the folds of a cross-validation.
        Members whose subsets need fewer steps per epoch idle (unchanged) in the
        others' last steps.
      **optimizer_hyperparams: lists of values of the optimizer's own
        hyperparameters to sweep, e.g. `weight_decay=[1e-4, 1e-2]` with "adamw",
        `b1=[0.8, 0.9]`.

    Returns:
      a `SweepResult`.

    Example:
      >>> import fml
      >>> data = fml.data.load("breast_cancer", validation=0.2)
      >>> result = fml.sweep(fml.models.svm(2), data, C=[0.1, 1.0, 10.0], epochs=3,
      ...                    learning_rate=1e-2)
      >>> len(result.table), result.compiles
      (3, 1)
    """
    if not isinstance(optimizer, str) or optimizer not in step_lib.OPTIMIZERS:
        raise ConfigError(
            f"sweep needs a minibatch optimizer by name, one of "
            f"{sorted(step_lib.OPTIMIZERS)}; got {optimizer!r}"
        )
    data = inputs.splits(data, validation)
    if data.stream is not None:
        raise ConfigError("sweep trains on arrays in memory, not a stream; load them as arrays")
    x, y, task = data.x, data.y, data.task
    (x_val, y_val), (x_test, y_test) = data.val or (None, None), data.test or (None, None)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"expected epochs to be an int >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"expected batch_size to be a positive int, got {batch_size!r}")
    batching.check_batching(x.shape[0], batch_size, drop_remainder)
    batch_size = batching.batch_rows(x.shape[0], batch_size)
    objective = step_lib.make_objective(model, loss, task)
    metric = metric or ("accuracy" if objective.classify else "r2")
    if not isinstance(metric, str):
        raise ConfigError(f"sweep needs a metric by name ('accuracy' or 'r2'), got {metric!r}")

    axes = {"seed": _seed_list(seeds), "learning_rate": _as_values("learning_rate", learning_rate)}
    axes.update({n: _as_values(n, v) for n, v in (("C", C), ("l2", l2)) if v is not None})
    axes.update({n: _as_values(n, v) for n, v in optimizer_hyperparams.items()})
    tx, members = _optimizer_and_members(
        model, axes, configs, optimizer, clip_norm=clip_norm, **(optimizer_kwargs or {})
    )
    check_arrays(x, y, task=task, where="training data")
    subsets = _check_subsets(subsets, len(members), x.shape[0])
    for subset in subsets or ():
        batching.check_batching(len(subset), batch_size, drop_remainder)
    sizes = [x.shape[0]] * len(members) if subsets is None else [len(s) for s in subsets]
    l2_values = [_member_l2(model, c, n) for c, n in zip(members, sizes)]
    state = _init_states(model, tx, x.shape[1:], members, l2_values)
    expected = inputs.check_targets(model, _take(state.params, 0), x, y, objective, "training data")
    splits = {"val": (x_val, y_val), "test": (x_test, y_test)}
    splits = {k: v for k, v in splits.items() if v[0] is not None}
    for name, (xs, ys) in {"train": (x, y), **splits}.items():
        check_arrays(xs, ys, task=task, num_outputs=expected, where=f"{name} data")
        if xs.shape[1:] != x.shape[1:]:
            raise ShapeError(f"{name} data: expected x of shape (N, {x.shape[1:]}), got {xs.shape}")

    train_step = step_lib.make_train_step(model, objective, tx)
    seeds = [c["seed"] for c in members]
    state, history, run = _train(
        train_step,
        state,
        x,
        y,
        seeds,
        epochs=epochs,
        batch_size=batch_size,
        fused=fused,
        drop_remainder=drop_remainder,
        subsets=subsets,
    )
    table = _table(members, history, _split_scores(model, objective, metric, state, splits), metric)
    selected_on = f"val_{metric}" if "val" in splits else "train_loss"
    best = _select(table, selected_on)
    return SweepResult(
        model=model,
        configs=members,
        state=state,
        table=table,
        metric=metric,
        best=best,
        selected_on=selected_on,
        history=history,
        compiles=run._cache_size(),
        loss=loss,
        task=task,
        splits=splits,
        input_shape=tuple(x.shape[1:]),
    )


def _optimizer_and_members(model, axes: dict, configs, optimizer, **optimizer_kwargs):
    """The optimizer (built with each axis's first value) and the checked members."""
    defaults = {n: v[0] for n, v in axes.items()}
    first_values = {n: v for n, v in defaults.items() if n not in MODEL_AXES}
    try:
        tx = step_lib.make_optimizer(optimizer, **{**optimizer_kwargs, **first_values})
    except TypeError as e:
        raise ConfigError(
            f"optimizer {optimizer!r} does not take {sorted(first_values)}: {e}"
        ) from e
    members = grid(**axes) if configs is None else [{**defaults, **dict(c)} for c in configs]
    if not members:
        raise ConfigError("expected at least one configuration, got an empty configs list")
    return tx, _complete(members, model, tx)


def _train(
    train_step, state, x, y, seeds, *, epochs, batch_size, fused, drop_remainder, subsets=None
):
    """Runs the vmapped step (or fused epoch) for `epochs`; returns the state, the
    per-epoch `[epochs, K]` train metrics and the jitted function."""
    if subsets is not None:
        return _train_subsets(
            train_step,
            state,
            x,
            y,
            seeds,
            subsets,
            epochs=epochs,
            batch_size=batch_size,
            fused=fused,
            drop_remainder=drop_remainder,
        )
    shared = len(set(seeds)) == 1  # one shuffle for all: the batch is not mapped
    key_axis = None if shared else 0
    if fused:
        epoch_fn = step_lib.make_epoch(
            train_step, batch_size=batch_size, drop_remainder=drop_remainder
        )
        run = jax.jit(jax.vmap(epoch_fn, in_axes=(0, None, None, key_axis)), donate_argnums=0)
        x_dev, y_dev = jax.device_put(x), jax.device_put(y)
    else:
        run = jax.jit(jax.vmap(train_step, in_axes=(0, key_axis)), donate_argnums=0)
    history: dict = {}
    for epoch in range(epochs):
        keys = _shuffle_keys(np.asarray(seeds, np.int32), epoch)
        keys = keys[0] if shared else keys
        if fused:
            state, step_metrics = run(state, x_dev, y_dev, keys)
        else:
            state, step_metrics = _host_epoch(run, state, x, y, keys, batch_size, drop_remainder)
        for k, v in _member_means(jax.device_get(step_metrics)).items():
            history.setdefault(f"train_{k}", []).append(v)
    history = {k: np.stack(v) for k, v in history.items()}
    return state, history, run


def _check_subsets(subsets, members: int, num_examples: int) -> list[np.ndarray] | None:
    """The members' training-example indices as int32 arrays, checked."""
    if subsets is None:
        return None
    subsets = [np.asarray(s) for s in subsets]
    if len(subsets) != members:
        raise ConfigError(f"expected one subset per member ({members}), got {len(subsets)}")
    for k, s in enumerate(subsets):
        if s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.integer):
            raise ConfigError(
                f"expected subset {k} to be a non-empty 1-D array of example indices, got "
                f"shape {s.shape} and dtype {s.dtype}"
            )
        if s.min() < 0 or s.max() >= num_examples:
            raise ConfigError(
                f"subset {k} indexes examples [{s.min()}, {s.max()}] of {num_examples}"
            )
    return [s.astype(np.int32) for s in subsets]


def _subset_epoch_indices(seeds, subsets, epoch: int, batch_size: int, drop_remainder, fused):
    """Each member's epoch over its own subset, as `fit` draws it (`fml.batching`;
    fused, a subset of at most `batch_size` examples is one batch in order): global
    example indices and mask `[S, K, B]`, a member's shorter batches (a subset
    smaller than `batch_size`) padded with mask-0 columns and its missing steps with
    mask-0 steps. One shuffle program per distinct subset size."""
    by_size: dict = {}
    for k, subset in enumerate(subsets):
        by_size.setdefault(len(subset), []).append(k)
    parts = {}
    for n, members in by_size.items():
        if fused and n <= batch_size:
            local = np.broadcast_to(np.arange(n), (1, len(members), n))
            mask = np.ones(local.shape, np.float32)
        else:
            keys = _shuffle_keys(np.asarray([seeds[k] for k in members], np.int32), epoch)
            local, mask = jax.device_get(_member_epoch_indices(keys, n, batch_size, drop_remainder))
        stacked = np.stack([subsets[k] for k in members])  # [Kn, n]
        index = stacked[np.arange(len(members))[None, :, None], local]
        columns = ((0, 0), (0, 0), (0, batch_size - index.shape[2]))
        parts[n] = (np.pad(index, columns), np.pad(mask, columns), members)
    steps = max(index.shape[0] for index, _, _ in parts.values())
    index = np.zeros((steps, len(subsets), batch_size), np.int32)
    mask = np.zeros((steps, len(subsets), batch_size), np.float32)
    for part_index, part_mask, members in parts.values():
        index[: part_index.shape[0], members] = part_index
        mask[: part_mask.shape[0], members] = part_mask
    return index, mask


def _idle_if_empty(train_step):
    """`train_step` that leaves the state as it was on a batch with no real example
    (a member's padding steps), where an optimizer would still move."""

    def step(state, batch):
        new, metrics = train_step(state, batch)
        active = jnp.any(batch["mask"] > 0)

        def keep(a, b):
            return a if _is_key(a) else jnp.where(active, a, b)

        return jax.tree.map(keep, new, state), metrics

    return step


def _train_subsets(
    train_step, state, x, y, seeds, subsets, *, epochs, batch_size, fused, drop_remainder
):
    """`_train` where member `k` trains on the examples `subsets[k]` (batches per member)."""
    counts = {batching.steps_per_epoch(len(s), batch_size, drop_remainder) for s in subsets}
    step = _idle_if_empty(train_step) if len(counts) > 1 else train_step  # else none idles
    if fused:
        steps = step_lib.make_steps(step)
        run = jax.jit(jax.vmap(steps, in_axes=(0, None, None, 1, 1)), donate_argnums=0)
        x_dev, y_dev = jax.device_put(x), jax.device_put(y)
    else:
        run = jax.jit(jax.vmap(step), donate_argnums=0)
    history: dict = {}
    for epoch in range(epochs):
        index, mask = _subset_epoch_indices(
            seeds, subsets, epoch, batch_size, drop_remainder, fused
        )
        if fused:
            state, step_metrics = run(state, x_dev, y_dev, index, mask)
        else:
            per_step = []
            for index_KxB, mask_KxB in zip(index, mask):
                batch = {"x": x[index_KxB], "y": y[index_KxB], "mask": mask_KxB}
                state, metrics = run(state, batch)
                per_step.append(metrics)
            step_metrics = jax.tree.map(lambda *v: np.stack(v, axis=1), *per_step)
        for k, v in _member_means(jax.device_get(step_metrics)).items():
            history.setdefault(f"train_{k}", []).append(v)
    return state, {k: np.stack(v) for k, v in history.items()}, run


def _member_l2(model: Model, config: dict, num_train: int) -> float:
    if "l2" in config:
        return float(config["l2"])
    if "C" in config:
        return models_lib.l2_strength({**model.spec, "C": config["C"]}, num_train)
    return models_lib.l2_strength(model.spec, num_train)


def _split_scores(model, objective, metric, state, splits) -> dict:
    """`{split: {"loss": [K], metric: [K]}}` for the validation and test splits."""
    stacked = _stacked(model)
    return {
        split: jax.device_get(_scores(objective, metric, predict(stacked, state.params, xs), ys))
        for split, (xs, ys) in splits.items()
    }


def _table(configs, history, scores, metric) -> list[dict]:
    rows = []
    for k, config in enumerate(configs):
        row = {"index": k, **config}
        row["train_loss"] = float(history["train_loss"][-1, k])
        for split, values in scores.items():
            row[f"{split}_loss"] = float(values["loss"][k])
            row[f"{split}_{metric}"] = float(values[metric][k])
        row["diverged"] = not all(
            math.isfinite(v) for name, v in row.items() if name.endswith(("_loss", metric))
        )
        rows.append(row)
    return rows


def _select(table: list[dict], column: str) -> int:
    """The member with the best finite `column` (highest metric, lowest loss); ties
    go to the lower loss on the same split, then to the lower index."""
    candidates = [row for row in table if not row["diverged"]]
    if not candidates:
        raise TrainingError(
            f"every one of the {len(table)} sweep members diverged (non-finite loss); "
            "lower the learning rates or set clip_norm"
        )
    if column.endswith("_loss"):
        return min(candidates, key=lambda row: (row[column], row["index"]))["index"]
    tie_break = column.split("_")[0] + "_loss"
    return min(candidates, key=lambda row: (-row[column], row[tie_break], row["index"]))["index"]
