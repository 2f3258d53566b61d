"""Fuzzing the public entry points with hypothesis: every generated input is bad in
at least one way, and the only exceptions that may escape are fml's own
(`FmlError`). The command line's argument errors exit through argparse
(`SystemExit(2)` with a `fml: error:` line), which is its contract.

Each test runs its own hypothesis search and checks how many inputs it tried; the
total is printed (`pytest -s`) and must reach 200.
"""

import functools
import math
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fml
import fml.cli
from fml import checkpoint
from fml.data import EMBEDDED
from fml.errors import CheckpointError, FmlError
from fml.models import cnn, conv, dense, max_pool
from fml.train import FULL_BATCH_OPTIMIZERS, OPTIMIZERS

EXAMPLES = {"fit": 70, "apply": 50, "load": 30, "restore": 40, "cli": 40}
TRIED: dict[str, int] = {}
FUZZ = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(12, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 12).astype(np.int32)
MLP = fml.models.mlp([8, 3])


def counted(name):
    """Decorates a hypothesis search so that `TRIED[name]` counts the inputs it tries."""

    def decorate(search):
        @functools.wraps(search)
        def search_and_count(*args, **kwargs):
            TRIED[name] = TRIED.get(name, 0) + 1
            return search(*args, **kwargs)

        return search_and_count

    return decorate


def check_quota(name, quota=None):
    quota = EXAMPLES[name] if quota is None else quota
    assert TRIED.get(name, 0) >= quota, f"{name}: only {TRIED.get(name, 0)} inputs tried"


def names_other_than(known):
    return st.one_of(
        st.text(max_size=12).filter(lambda s: s not in known),
        st.integers(-5, 5),
        st.none(),
        st.lists(st.text(max_size=3), max_size=2),
    )


# ------------------------------------------------------------------ fit

BAD_NUMBERS = st.sampled_from([0, -1, -0.5, math.nan, math.inf, -math.inf, "1", None, [1]])


@st.composite
def bad_fit_calls(draw):
    """`(data, kwargs)` with one to three defects, each enough to be refused."""
    x, y, model = X.copy(), Y.copy(), MLP
    kwargs = {"epochs": 1, "batch_size": 4}
    defects = draw(
        st.lists(
            st.sampled_from(
                [
                    "x_dtype",
                    "x_rank",
                    "y_length",
                    "labels",
                    "nonfinite",
                    "empty",
                    "batch_size",
                    "epochs",
                    "learning_rate",
                    "optimizer",
                    "loss",
                    "clip_norm",
                    "validation",
                    "seed",
                    "l2",
                    "container",
                    "model",
                ]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    for defect in defects:
        if defect == "x_dtype":
            x = x.astype(draw(st.sampled_from([np.int32, np.int8, np.bool_, np.complex64, str])))
        elif defect == "x_rank" and x.ndim == 2:  # (else x is a scalar: bad already)
            x = x[:, 0] if draw(st.booleans()) or not x.size else x[0, 0]
        elif defect == "y_length":
            y = np.concatenate([y, np.zeros(draw(st.integers(1, 3)), y.dtype)])
        elif defect == "labels":
            y = y + draw(st.sampled_from([-1, 3, 100, -(2**20)]))
        elif defect == "nonfinite" and x.size and np.issubdtype(x.dtype, np.floating):
            x = x.copy()  # (an x that is empty or not float is bad already)
            x.reshape(-1)[draw(st.integers(0, x.size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf])
            )
        elif defect == "empty" and x.ndim:
            x, y = x[:0], y[:0]
        elif defect in ("batch_size", "epochs"):
            kwargs[defect] = draw(
                st.one_of(st.integers(-3, -1), st.sampled_from([2.0, "4", None, True]))
            )
        elif defect == "learning_rate":
            kwargs[defect] = draw(BAD_NUMBERS)
        elif defect == "clip_norm":  # (None is its default: no clipping)
            kwargs[defect] = draw(BAD_NUMBERS.filter(lambda v: v is not None))
        elif defect == "optimizer":
            kwargs[defect] = draw(names_other_than({*OPTIMIZERS, *FULL_BATCH_OPTIMIZERS}))
        elif defect == "loss":
            kwargs[defect] = draw(
                st.text(min_size=1, max_size=12).filter(lambda s: s not in fml.losses.LOSSES)
            )
        elif defect == "validation":
            kwargs[defect] = draw(
                st.sampled_from([1.0, 1.5, -0.1, math.nan, math.inf, "half", [0.2]])
            )
        elif defect == "seed":
            kwargs[defect] = draw(st.sampled_from(["0", 1.0, None, [0]]))
        elif defect == "l2":
            kwargs[defect] = draw(st.sampled_from([-1.0, math.nan, math.inf, "0.1", [0.0]]))
        elif defect == "container":
            return (
                draw(st.sampled_from([(x,), (x, y, y), {"x": x, "y": y}, x, None])),
                model,
                kwargs,
            )
        elif defect == "model":
            model = draw(st.sampled_from([None, "mlp", MLP.spec, MLP.apply]))
    return (x, y), model, kwargs


def test_fuzz_fit():
    @settings(max_examples=EXAMPLES["fit"], **FUZZ)
    @given(call=bad_fit_calls())
    @counted("fit")
    def search(call):
        data, model, kwargs = call
        with pytest.raises(FmlError):
            fml.fit(model, data, quiet=True, **kwargs)

    TRIED.pop("fit", None)
    search()
    check_quota("fit")


# ------------------------------------------------------------------ Model.apply

FAMILIES = {
    "mlp": (MLP, (4,)),
    "cnn": (cnn([conv(4, 3), max_pool(2), dense(3)]), (8, 1)),
    "gru": (fml.models.rnn("gru", 4, num_classes=3), (5, 2)),
    "logistic": (fml.models.logistic_regression(3), (4,)),
}
PARAMS = {name: m.init(jax.random.key(0), shape) for name, (m, shape) in FAMILIES.items()}


def accepts_shape(family: str, shape: tuple) -> bool:
    """Whether `family`'s apply takes float inputs of this shape."""
    if len(shape) < 2:
        return False
    if family in ("mlp", "logistic"):
        return math.prod(shape[1:]) == 4
    if family == "cnn":
        return shape[1:] == (8, 1)
    return len(shape) == 3 and shape[2] == 2 and shape[1] > 0


@st.composite
def bad_apply_inputs(draw):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    kind = draw(st.sampled_from(["shape", "dtype", "not_an_array"]))
    if kind == "shape":
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
        if accepts_shape(family, shape):
            shape = (*shape, 3)  # one more axis: never accepted
        x = np.zeros(shape, draw(st.sampled_from([np.float32, np.float16])))
    elif kind == "dtype":
        shape = (2, *FAMILIES[family][1])
        dtype = draw(st.sampled_from([np.int32, np.uint8, np.bool_, np.complex64, str, object]))
        x = np.zeros(shape).astype(dtype)
    else:
        x = draw(
            st.one_of(
                st.none(),
                st.text(max_size=5),
                st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                st.lists(
                    st.lists(st.floats(allow_nan=False), max_size=3), min_size=2, max_size=3
                ).filter(lambda rows: len({len(r) for r in rows}) > 1),
            )
        )
    return family, x


def test_fuzz_apply():
    @settings(max_examples=EXAMPLES["apply"], **FUZZ)
    @given(case=bad_apply_inputs())
    @counted("apply")
    def search(case):
        family, x = case
        with pytest.raises(FmlError):
            FAMILIES[family][0].apply(PARAMS[family], x)

    TRIED.pop("apply", None)
    search()
    check_quota("apply")


# ------------------------------------------------------------------ fml.data.load


@st.composite
def bad_load_calls(draw):
    if draw(st.booleans()):
        return draw(names_other_than(EMBEDDED)), {}
    option = draw(st.sampled_from(["validation", "standardize", "seed"]))
    value = {
        "validation": st.sampled_from([1.0, -0.2, 2, math.nan, "0.1", None, [0.1]]),
        "standardize": st.sampled_from(["yes", 2, -1, [True], math.nan]),
        "seed": st.sampled_from([-1, 0.5, "0", None, [0]]),
    }[option]
    return draw(st.sampled_from(sorted(EMBEDDED))), {option: draw(value)}


def test_fuzz_load():
    @settings(max_examples=EXAMPLES["load"], **FUZZ)
    @given(call=bad_load_calls())
    @counted("load")
    def search(call):
        name, kwargs = call
        with pytest.raises(FmlError):
            fml.data.load(name, **kwargs)

    TRIED.pop("load", None)
    search()
    check_quota("load")


# ------------------------------------------------------------------ fml.checkpoint.restore


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A run directory with checkpoints at steps 1 and 2 (saved without training)."""
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    tx = fml.train.make_optimizer("adam", 1e-3)
    state = fml.train.init_state(MLP, tx, (4,))
    meta = {
        "spec": MLP.spec,
        "config": checkpoint.fit_config(X, Y, optimizer="adam", learning_rate=1e-3),
    }
    writer = checkpoint.Checkpointer(run_dir)
    for step in (1, 2):
        writer.save(state._replace(step=state.step + step), meta)
    files = sorted(p.relative_to(run_dir) for p in (run_dir / "checkpoints").rglob("*"))
    return run_dir, jax.device_get(state.params), files


@st.composite
def damages(draw, files):
    path = draw(st.sampled_from(files))
    how = draw(st.sampled_from(["truncate", "flip", "delete", "garbage", "empty"]))
    return path, how, draw(st.floats(0.0, 1.0)), draw(st.binary(min_size=1, max_size=64))


def apply_damage(run_dir, damage):
    path, how, where, garbage = damage
    target = run_dir / path
    if how == "delete" or target.is_dir():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return
    data = bytearray(target.read_bytes())
    cut = int(where * len(data))
    if how == "truncate":
        data = data[:cut]
    elif how == "flip" and data:
        data[min(cut, len(data) - 1)] ^= 0xFF
    elif how == "garbage":
        data[cut : cut + len(garbage)] = garbage
    elif how == "empty":
        data = b""
    target.write_bytes(bytes(data))


def test_fuzz_restore(pristine, tmp_path):
    run_dir, params, files = pristine

    @settings(max_examples=EXAMPLES["restore"] - 10, **FUZZ)
    @given(damage=damages([str(f) for f in files]))
    @counted("restore")
    def search_damage(damage):
        copy = tmp_path / f"copy{TRIED['restore']}"
        shutil.copytree(run_dir, copy)
        apply_damage(copy, (pathlib.Path(damage[0]), *damage[1:]))
        try:
            _, state = checkpoint.restore(copy)
        except CheckpointError:
            return
        # A damage restore does not notice must have spared the arrays: they are checked.
        restored = jax.device_get(state.params)
        assert all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params))
        )

    @settings(max_examples=10, **FUZZ)
    @given(
        where=st.one_of(st.none(), st.integers(), st.text(max_size=8), st.just("a\0b")),
        step=st.one_of(
            st.integers(-3, 5).filter(lambda s: s not in (1, 2)),
            st.sampled_from([True, 1.0, "2", None, [2]]),
        ),
    )
    @counted("restore")
    def search_arguments(where, step):
        where = run_dir if where is None else where  # the real run: then the step is bad
        if where == run_dir and step is None:
            step = 3
        with pytest.raises(CheckpointError):
            checkpoint.restore(where, step=step)

    TRIED.pop("restore", None)
    search_damage()
    search_arguments()
    check_quota("restore")


# ------------------------------------------------------------------ the command line


def subcommands() -> set[str]:
    parser = fml.cli.build_parser()
    return set(next(a for a in parser._actions if a.dest == "command").choices)


@st.composite
def bad_argvs(draw):
    """Argument lists argparse must refuse: an unknown flag or an unknown command."""
    known = sorted(subcommands())
    tokens = draw(
        st.lists(
            st.one_of(st.sampled_from([*known, "--out", "x", "--quick"]), st.text(max_size=6)),
            max_size=4,
        )
    )
    tokens = [t for t in tokens if t not in ("-h", "--help") and not t.startswith("-h")]
    if draw(st.booleans()):
        bad = "--fml-no-such-flag-" + draw(st.text("abcxyz", max_size=4))
        tokens.insert(draw(st.integers(0, len(tokens))), bad)
        return [draw(st.sampled_from(known)), *tokens]
    command = draw(
        st.text(min_size=1, max_size=8).filter(lambda s: s not in known and not s.startswith("-"))
    )
    return [command, *tokens]


def test_fuzz_cli_arguments(capsys):
    @settings(max_examples=EXAMPLES["cli"], **FUZZ)
    @given(argv=bad_argvs())
    @counted("cli")
    def search(argv):
        with pytest.raises(SystemExit) as parsed:
            fml.cli.build_parser().parse_args(argv)
        with pytest.raises(SystemExit) as ran:
            fml.cli.main(argv)
        assert parsed.value.code == ran.value.code == 2
        assert re.search(r"^fml( \S+)?: error: ", capsys.readouterr().err, flags=re.M)

    TRIED.pop("cli", None)
    search()
    check_quota("cli")


def test_quotas_add_up_to_200_bad_inputs():
    """Each search above asserts it tried its quota; the quotas make 200 or more."""
    if TRIED:
        print(f"\nfuzzed bad inputs: {TRIED} = {sum(TRIED.values())}")
    assert sum(EXAMPLES.values()) >= 200
