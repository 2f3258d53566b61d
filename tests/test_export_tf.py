"""TF SavedModel export: every family and variant, reloaded in ONE separate Python
process in which jax cannot be imported, matches fml's apply on a probe batch and,
through the polymorphic batch (and time, for RNNs) axis, on a batch of other shape."""

import json
import subprocess
import sys
import textwrap

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
    import json, sys
    for name in ("jax", "jaxlib", "fml"):
        sys.modules[name] = None  # `import jax` now raises ImportError
    import numpy as np
    import tensorflow as tf

    root = sys.argv[1]
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
    jax_loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib")
                        and sys.modules[m] is not None)
    np.savez(f"{root}/outputs.npz", **outputs)
    json.dump({"signatures": signatures, "jax_loaded": jax_loaded},
              open(f"{root}/report.json", "w"))
    """
)


def _second_probe_shape(model, input_shape):
    """Another batch size, and for RNNs another number of steps."""
    if model.family == "rnn":
        return 2, (input_shape[0] + 3, *input_shape[1:])
    return 2, input_shape


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Writes every case's SavedModel, reloads them all in one jax-free process."""
    root = tmp_path_factory.mktemp("saved_models")
    probes, expected = {}, {}
    for name, model, input_shape in CASES:
        params = random_params(model, input_shape)
        write_saved_model(model, params, input_shape, root / name)
        batch, shape = _second_probe_shape(model, input_shape)
        for key, x in (("first", probe(input_shape)), ("second", probe(shape, batch, seed=3))):
            probes[f"{name}/{key}"] = x
            expected[f"{name}/{key}"] = fml_forward(model, params, x)
    np.savez(root / "probes.npz", **probes)
    (root / "names.json").write_text(json.dumps(IDS))
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_JAX, str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "report.json").read_text())
    with np.load(root / "outputs.npz") as outputs:
        got = {k: outputs[k] for k in outputs.files}
    return report, got, expected


def test_reload_process_had_no_jax(reloaded):
    report, _, _ = reloaded
    assert report["jax_loaded"] == []


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
    monkeypatch.setattr(
        tf_export, "run_saved_model", lambda *a: real_run(*a) + np.float32(1e-3)
    )
    with pytest.raises(ExportError, match=r"max abs diff 0\.001.* exceeds tolerance"):
        export(model, params, path, to="savedmodel", input_shape=input_shape)
    assert sorted(p.name for p in path.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model"]
