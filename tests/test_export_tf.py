"""TF SavedModel export: every family and variant, reloaded in ONE separate Python
process in which jax cannot be imported, matches fml's apply on a probe batch and,
through the polymorphic batch (and time, for RNNs) axis, on a batch of other shape."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export_torch import CASES, IDS, fml_forward, max_diff, probe, random_params

from fml.errors import ExportError
from fml.export import export
from fml.export.tensorflow import write_saved_model

TOLERANCE = 1e-5

# Runs with jax made unimportable before tensorflow is imported (tensorflow imports
# jax when both are installed); loads every SavedModel, checks its signature and
# writes its outputs on both probes.
RELOAD_WITHOUT_JAX = textwrap.dedent(
    """
    import json, os, sys, time
    for name in ("jax", "jaxlib", "fml"):
        sys.modules[name] = None  # `import jax` now raises ImportError
    import numpy as np
    import tensorflow as tf

    root = sys.argv[1]
    deadline = time.monotonic() + 600
    while not os.path.exists(f"{root}/names.json"):  # written last, by a rename
        assert time.monotonic() < deadline, "the SavedModels never came"
        time.sleep(0.05)
    probes = np.load(f"{root}/probes.npz")
    outputs, signatures = {}, {}
    for name in json.loads(open(f"{root}/names.json").read()):
        serve = tf.saved_model.load(f"{root}/{name}").signatures["serving_default"]
        args, kwargs = serve.structured_input_signature
        signatures[name] = {
            "inputs": {k: v.shape.as_list() for k, v in kwargs.items()},
            "outputs": sorted(serve.structured_outputs),
        }
        for probe in ("first", "second"):
            x = tf.constant(probes[f"{name}/{probe}"])
            outputs[f"{name}/{probe}"] = serve(x=x)["y"].numpy()
    # Gradients through the reloaded model reach its variables (fine-tuning in TF).
    gru = tf.saved_model.load(f"{root}/gru")
    variables = tf.nest.flatten(gru.params)  # sorted keys, as jax.tree.leaves
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(gru.serve(tf.constant(probes["gru/first"]))["y"] ** 2)
    for i, g in enumerate(tape.gradient(loss, variables)):
        outputs[f"gru/grad/{i}"] = g.numpy()
    jax_loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib")
                        and sys.modules[m] is not None)
    np.savez(f"{root}/outputs.npz", **outputs)
    json.dump({"signatures": signatures, "jax_loaded": jax_loaded},
              open(f"{root}/report.json", "w"))
    """
)


def _probes(model, input_shape):
    """A probe batch and one of another size (and, for RNNs, another number of steps)."""
    first = probe(input_shape)
    if model.family != "rnn":
        return {"first": first, "second": first[:2]}
    return {"first": first, "second": probe((input_shape[0] + 3, *input_shape[1:]), 2, seed=3)}


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Reloads every case's SavedModel in one jax-free process, which starts (and imports
    tensorflow) while they are written and runs while fml computes its outputs."""
    root = tmp_path_factory.mktemp("saved_models")
    reload = subprocess.Popen(
        [sys.executable, "-c", RELOAD_WITHOUT_JAX, str(root)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        probes, params = {}, {}
        for name, model, input_shape in CASES:
            params[name] = random_params(model, input_shape)
            write_saved_model(model, params[name], input_shape, root / name)
            probes.update({f"{name}/{k}": x for k, x in _probes(model, input_shape).items()})
        np.savez(root / "probes.npz", **probes)
        (root / "names.tmp").write_text(json.dumps(IDS))
        (root / "names.tmp").rename(root / "names.json")
        expected = {}
        for name, model, _ in CASES:
            first = fml_forward(model, params[name], probes[f"{name}/first"])
            second = probes[f"{name}/second"]
            expected[f"{name}/first"] = first
            expected[f"{name}/second"] = (
                first[: len(second)]
                if model.family != "rnn"
                else fml_forward(model, params[name], second)
            )
        _, stderr = reload.communicate(timeout=600)
    finally:
        reload.kill()
    assert reload.returncode == 0, stderr[-3000:]
    report = json.loads((root / "report.json").read_text())
    with np.load(root / "outputs.npz") as outputs:
        got = {k: outputs[k] for k in outputs.files}
    return report, got, expected


def test_reload_process_had_no_jax(reloaded):
    report, _, _ = reloaded
    assert report["jax_loaded"] == []


def test_saved_model_gradients_match_jax(reloaded):
    """d/dparams sum(y^2) through the jax-free SavedModel equals jax.grad through fml."""
    _, got, _ = reloaded
    _, model, input_shape = CASES[IDS.index("gru")]
    params = random_params(model, input_shape)
    x = probe(input_shape)
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
    for i, want in enumerate(jax.tree.leaves(grads)):
        assert max_diff(got[f"gru/grad/{i}"], want) <= TOLERANCE * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name,model,input_shape", CASES, ids=IDS)
def test_saved_model_matches_fml_without_jax(name, model, input_shape, reloaded):
    report, got, expected = reloaded
    signature = report["signatures"][name]
    time_axis = [None] if model.family == "rnn" else list(input_shape[:-1])
    assert signature == {"inputs": {"x": [None, *time_axis, input_shape[-1]]}, "outputs": ["y"]}
    for probe_name in ("first", "second"):
        key = f"{name}/{probe_name}"
        diff = max_diff(got[key], expected[key])
        print(f"savedmodel {key}: max abs diff {diff:.2e}")
        assert diff <= TOLERANCE, key


def test_verified_export_replaces_only_on_success(tmp_path, monkeypatch):
    """`export` verifies in TF; a corrupted artifact fails loudly and leaves the old one."""
    _, model, input_shape = CASES[IDS.index("gru")]
    params = random_params(model, input_shape)
    path = tmp_path / "saved_model"
    result = export(model, params, path, to="savedmodel", input_shape=input_shape)
    assert result.max_abs_diff <= TOLERANCE and (path / "saved_model.pb").is_file()
    before = sorted(p.name for p in path.iterdir())

    import fml.export.tensorflow as tf_export

    real_run = tf_export.run_saved_model
    monkeypatch.setattr(tf_export, "run_saved_model", lambda *a: real_run(*a) + np.float32(1e-3))
    with pytest.raises(ExportError, match=r"max abs diff 0\.001.* exceeds tolerance"):
        export(model, params, path, to="savedmodel", input_shape=input_shape)
    assert sorted(p.name for p in path.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model"]


@pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.python.interpreter")
@pytest.mark.parametrize("name", ["cnn2d_same_pools", "cnn1d_valid_max", "cnn2d_valid_max"])
def test_pooling_cnn_saved_model_converts_to_tflite(name, tmp_path):
    """A pooling CNN's SavedModel (every platform's branch in it) converts to TFLite —
    its pools are slices and `reduce_window`s, no dynamic gather — and the TFLite
    interpreter reproduces fml's forward pass, at two batch sizes."""
    import tensorflow as tf

    _, model, input_shape = CASES[IDS.index(name)]
    params = random_params(model, input_shape)
    write_saved_model(model, params, input_shape, tmp_path / name)
    flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / name)).convert()
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    (entry,) = interpreter.get_input_details()
    for batch in (5, 2):
        x = probe(input_shape, batch)
        interpreter.resize_tensor_input(entry["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(entry["index"], x)
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        diff = max_diff(got, fml_forward(model, params, x))
        print(f"tflite {name} batch {batch}: max abs diff {diff:.2e}")
        assert diff <= TOLERANCE


def _serialised_platforms(path) -> set:
    """The platforms of every `XlaCallModule` op in a SavedModel's serving graph."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(path)).signatures["serving_default"].graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    calls = [n for n in nodes if n.op == "XlaCallModule"]
    assert calls, "no XlaCallModule in the SavedModel"
    return {tuple(p.decode() for p in n.attr["platforms"].list.s) for n in calls}


def test_saved_model_platforms_default_and_cli_flag(tmp_path, capsys):
    """By default a SavedModel holds programs for CPU, CUDA and TPU; `fml export
    --platforms cpu` writes only CPU's; `--platforms` with another target is refused."""
    from test_export_torch import _write_run

    from fml import cli

    run_dir, _ = _write_run(tmp_path, "cnn2d_same_pools")
    assert cli.main(["export", str(run_dir), "--to", "savedmodel"]) == 0
    assert _serialised_platforms(run_dir / "export" / "saved_model") == {("CPU", "CUDA", "TPU")}
    out = tmp_path / "cpu_only"
    argv = ["export", str(run_dir), "--to", "savedmodel", "--out", str(out), "--platforms", "cpu"]
    assert cli.main(argv) == 0
    assert _serialised_platforms(out) == {("CPU",)}
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--to", "torch", "--platforms", "cpu"]) == 2
    assert "--platforms is for --to savedmodel" in capsys.readouterr().err
