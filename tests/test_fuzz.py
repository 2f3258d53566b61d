"""Fuzzing the public entry points with hypothesis: every generated input is bad in
at least one way, and the only exceptions that may escape are fml's own
(`FmlError`). The command line's argument errors exit through argparse
(`SystemExit(2)` with a `fml: error:` line), which is its contract.

Every search is derandomised (the same inputs on every run, in CI too; set
`FML_FUZZ_EXPLORE=1` to draw fresh ones) and checks that it tried its quota of
inputs (`EXAMPLES`, 1,000 and more in all); each input runs under a deadline, so a
hang fails the test instead of stalling it.
"""

import contextlib
import functools
import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import zipfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fml
import fml.cli
from fml import checkpoint, rundir
from fml.data import EMBEDDED
from fml.errors import CheckpointError, FmlError
from fml.models import cnn, conv, dense, max_pool
from fml.train import FULL_BATCH_OPTIMIZERS, OPTIMIZERS

EXAMPLES = {
    "fit": 120,
    "apply": 150,
    "load": 60,
    "stream": 100,
    "restore": 90,
    "load_run": 150,
    "state_dict": 150,
    "safetensors": 100,
    "cli": 100,
    "cli_commands": 30,
}
TRIED: dict[str, int] = {}
FUZZ = dict(
    deadline=None,
    database=None,
    derandomize=not os.environ.get("FML_FUZZ_EXPLORE"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
HANG_S = 30  # no single input may take longer (compilation included)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(12, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 12).astype(np.int32)
MLP = fml.models.mlp([8, 3])


def counted(name):
    """Decorates a hypothesis search so that `TRIED[name]` counts the inputs it tries
    and each one fails (as a hang) if it runs past `HANG_S` seconds."""

    def decorate(search):
        @functools.wraps(search)
        def search_and_count(*args, **kwargs):
            TRIED[name] = TRIED.get(name, 0) + 1
            with deadline(HANG_S):
                return search(*args, **kwargs)

        return search_and_count

    return decorate


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises `TimeoutError` in the main thread if the block runs past `seconds`."""

    def hang(signum, frame):
        raise TimeoutError(f"hung: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_search(name, search):
    """Runs a hypothesis search counted as `name` and checks it tried its quota."""
    TRIED.pop(name, None)
    search()
    check_quota(name)


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

    run_search("fit", search)


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

    run_search("apply", search)


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

    run_search("load", search)


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

    run_search("cli", search)


# ------------------------------------------------------------------ fml.data.BatchStream

BAD_STREAM_OPTIONS = {
    "batch_size": st.sampled_from([0, -4, 2.5, "8", None, True, [4]]),
    "seed": st.sampled_from([0.5, "0", None, [0], math.nan]),
    "epochs": st.sampled_from([-1, 1.5, "2", [1]]),
    "position": st.sampled_from([(0, 99), (-1, 0), (0,), (0, 0, 0), ("0", 0), (0.5, 0), 7, None]),
    "prefetch": st.sampled_from([-1, 1.5, "2", None]),
    "workers": st.sampled_from([0, -2, 1.5, "1", None]),
    "process_index": st.sampled_from([-1, 5, 0.5, "0"]),
    "process_count": st.sampled_from([0, -1, 1.5, "1"]),
    "drop_remainder": st.sampled_from(["yes", 2, None]),
}


@st.composite
def bad_streams(draw):
    """`(source_arrays, options)`: bad arrays for the source, or one to three bad options."""
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["y_length", "empty", "x_scalar", "ragged"]))
        x, y = {
            "y_length": (X, Y[:5]),
            "empty": (X[:0], Y[:0]),
            "x_scalar": (np.float32(1.0), Y),
            "ragged": ([[0.0, 1.0], [2.0]], [0, 1]),
        }[kind]
        return (x, y), {"batch_size": 4}
    names = draw(st.lists(st.sampled_from(sorted(BAD_STREAM_OPTIONS)), min_size=1, max_size=3,
                          unique=True))  # fmt: skip
    options = {"batch_size": 4, **{n: draw(BAD_STREAM_OPTIONS[n]) for n in names}}
    if options.get("drop_remainder") is None and "drop_remainder" in names:
        options["drop_remainder"] = "yes"
    return (X, Y), options


def test_fuzz_stream():
    @settings(max_examples=EXAMPLES["stream"], **FUZZ)
    @given(case=bad_streams())
    @counted("stream")
    def search(case):
        (x, y), options = case
        with pytest.raises(FmlError):
            stream = fml.data.BatchStream(fml.data.ArraySource(x, y), **options)
            for _ in zip(range(3), stream):
                pass

    run_search("stream", search)


# ------------------------------------------------------------------ fml.rundir.load_run

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory (spec, config, params, history) of `MLP` on 4 features."""
    run_dir = tmp_path_factory.mktemp("fuzz_run") / "run"
    params = MLP.init(jax.random.key(0), (4,))
    config = {"input_shape": [4], "dataset": "iris", "task": "classification"}
    rundir.save_run(run_dir, model=MLP, params=params, config=config, history={"loss": [1.0]})
    return run_dir, jax.device_get(params)


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, a, allow_pickle=False)
            archive.writestr(f"{name}.npy", member.getvalue())
    return buffer.getvalue()


ARRAY_DTYPES = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64, "U2", "S3"]
)


@st.composite
def run_damages(draw):
    """`(file, new_bytes_or_None_to_delete)` for one file of a run directory."""
    name = draw(st.sampled_from(["spec.json", "config.json", "params.npz"]))
    how = draw(st.sampled_from(["json", "json_edit", "bytes", "truncate", "delete", "arrays"]))
    if how == "delete":
        return name, None
    if how == "json":
        return name, json.dumps(draw(JSON)).encode()
    if how == "json_edit" and name != "params.npz":
        base = {"spec.json": dict(MLP.spec), "config.json": {"input_shape": [4]}}[name]
        base[draw(st.sampled_from([*base, "family", "widths", "input_shape"]))] = draw(JSON)
        return name, json.dumps(base).encode()
    if how == "arrays" or (how == "json_edit" and name == "params.npz"):
        keys = draw(st.lists(st.sampled_from(["dense_0/w", "dense_0/b", "dense_1/w", "x/y"]),
                             max_size=4, unique=True))  # fmt: skip
        shapes = st.lists(st.integers(0, 9), max_size=3).map(tuple)
        arrays = {k: np.zeros(draw(shapes), draw(ARRAY_DTYPES)) for k in keys}
        return "params.npz", _npz_bytes(arrays)
    if how == "truncate":
        return name, ("cut", draw(st.floats(0, 1)))
    return name, draw(st.binary(max_size=200))


def test_fuzz_load_run(saved_run, tmp_path):
    run_dir, params = saved_run

    @settings(max_examples=EXAMPLES["load_run"], **FUZZ)
    @given(damage=run_damages())
    @counted("load_run")
    def search(damage):
        copy = tmp_path / f"copy{TRIED['load_run']}"
        shutil.copytree(run_dir, copy)
        name, content = damage
        if content is None:
            (copy / name).unlink()
        elif isinstance(content, tuple):
            data = (copy / name).read_bytes()
            (copy / name).write_bytes(data[: int(content[1] * len(data))])
        else:
            (copy / name).write_bytes(content)
        try:
            model, loaded, _ = rundir.load_run(copy)
        except CheckpointError:
            return
        # A damage load_run accepts must have kept a usable model with the saved params' shapes.
        assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, params)
        assert model.apply(loaded, X).shape == (12, 3)

    run_search("load_run", search)


# ------------------------------------------------------------------ state dicts and safetensors

torch = pytest.importorskip("torch")
from fml.export import torch as fml_torch  # noqa: E402

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2]  # fmt: skip
GOOD_STATE = fml_torch.to_state_dict(MLP, MLP.init(jax.random.key(0), (4,)), (4,))


@st.composite
def bad_state_dicts(draw):
    kind = draw(st.sampled_from(["tensor", "value", "keys", "container"]))
    state = dict(GOOD_STATE)
    key = draw(st.sampled_from(sorted(state)))
    if kind == "tensor":
        shape = state[key].shape
        if draw(st.booleans()):
            shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
        dtype = draw(st.sampled_from(TORCH_DTYPES))
        if shape == tuple(state[key].shape) and dtype in fml_torch.FLOAT_DTYPES:
            dtype = torch.int32  # (else it is a good tensor)
        state[key] = torch.zeros(shape, dtype=dtype)
    elif kind == "value":
        state[key] = draw(st.one_of(st.none(), st.text(max_size=4), st.integers(), JSON))
    elif kind == "keys":
        if draw(st.booleans()):
            del state[key]
        else:
            state[draw(st.text(max_size=8).filter(lambda k: k not in state))] = state[key]
    else:
        return draw(st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=3),
                              st.text(max_size=4)))  # fmt: skip
    return state


def test_fuzz_from_state_dict():
    @settings(max_examples=EXAMPLES["state_dict"], **FUZZ)
    @given(state=bad_state_dicts())
    @counted("state_dict")
    def search(state):
        with pytest.raises(FmlError):
            fml_torch.from_state_dict(MLP, state, (4,))

    run_search("state_dict", search)


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_st") / "model.safetensors"
    fml_torch.write_safetensors(MLP, MLP.init(jax.random.key(0), (4,)), (4,), path)
    return path


def test_fuzz_safetensors(safetensors_file, tmp_path):
    good = safetensors_file.read_bytes()

    @settings(max_examples=EXAMPLES["safetensors"], **FUZZ)
    @given(damage=damages(["model.safetensors"]), header=st.booleans())
    @counted("safetensors")
    def search(damage, header):
        copy = tmp_path / f"m{TRIED['safetensors']}.safetensors"
        copy.write_bytes(good)
        _, how, where, garbage = damage
        if header:  # aim at the 8-byte length and the JSON header
            where = where * (8 + int.from_bytes(good[:8], "little")) / len(good)
        apply_damage(tmp_path, (copy.name, how if how != "delete" else "empty", where, garbage))
        try:
            state = fml_torch.load_state_dict(copy)
            params = fml_torch.from_state_dict(MLP, state, (4,))
        except CheckpointError:
            return
        assert MLP.apply(params, X).shape == (12, 3)  # damage in the data bytes only

    run_search("safetensors", search)


# ------------------------------------------------------------------ command-line commands


@st.composite
def bad_commands(draw, run_dir):
    """Whole commands that parse but must fail with `fml: error:` (status 2), fast."""
    kind = draw(st.sampled_from(["train", "eval", "export"]))
    if kind == "train":
        flag, value = draw(st.sampled_from([
            ("--dataset", "no_such_set"), ("--epochs", "-1"), ("--batch-size", "0"),
            ("--batch-size", "-5"), ("--lr", "-0.1"), ("--lr", "nan"), ("--validation", "1.5"),
            ("--validation", "-0.5"), ("--weight-decay", "nan"), ("--optimizer", "nope"),
        ]))  # fmt: skip
        family = draw(st.sampled_from(["mlp", "logistic_regression", "cnn"]))
        args = [
            "train",
            family,
            "--dataset",
            "iris",
            "--out",
            str(run_dir.parent / "t"),
            flag,
            value,
        ]
        return args
    where = draw(st.sampled_from([run_dir / "missing", run_dir.parent / "not_a_run", run_dir]))
    if kind == "eval":
        return ["eval", str(where), *(["--dataset", "nope"] if where == run_dir else [])]
    return ["export", str(where), "--to", draw(st.sampled_from(["torch", "onnx"])),
            *(["--tolerance", "-1"] if where == run_dir else [])]  # fmt: skip


def test_fuzz_cli_commands(saved_run, tmp_path, capsys):
    run_dir, _ = saved_run
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "spec.json").write_text("[1, 2")
    run = pathlib.Path(shutil.copytree(run_dir, tmp_path / "run"))

    @settings(max_examples=EXAMPLES["cli_commands"], **FUZZ)
    @given(argv=bad_commands(run))
    @counted("cli_commands")
    def search(argv):
        assert fml.cli.main(argv) == 2, argv
        assert re.search(r"^fml: error: ", capsys.readouterr().err, flags=re.M)

    run_search("cli_commands", search)
