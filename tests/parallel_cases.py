"""The training runs the data-parallel proofs compare, shared by the tests and,
run as a script, by each process of a multi-process test:

  python tests/parallel_cases.py PORT NUM_PROCESSES PROCESS_ID LOCAL_DEVICES OUT_DIR [TIMEOUT_S]

joins the run on 127.0.0.1:PORT, trains every case, and saves each one's params
with `fml.rundir.save_run` under OUT_DIR/<case> (only process 0 writes). It
exits with status 3 and the message on stderr when joining fails with an
`FmlError`.
"""

import functools
import os
import sys

STEPS = 20
BATCH = 16
SEED = 0


def families():
    import fml

    return {
        "mlp": fml.models.mlp([16, 3]),
        "cnn": fml.models.cnn(
            [fml.models.conv(4, 3), fml.models.max_pool(2), fml.models.dense(8)], 3
        ),
        "lstm": fml.models.rnn("lstm", 8, num_classes=3),
    }


def data(num_examples: int = STEPS * BATCH):
    """Random sequences `[N, 8, 1]` and labels in 0..2, the same in every process."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(num_examples, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, num_examples).astype(np.int32)
    return x, y


def train(family: str, parallel=None, fused: bool = False, *, batch_size=BATCH, devices=None):
    """Params (as numpy) after one epoch of `STEPS` steps of adam at a fixed seed."""
    return _train(family, parallel, fused, batch_size, devices)


@functools.cache
def _train(family, parallel, fused, batch_size, devices):
    import jax

    import fml

    state, _ = fml.fit(
        families()[family],
        data(),
        optimizer="adam",
        learning_rate=1e-2,
        epochs=1,
        batch_size=batch_size,
        seed=SEED,
        fused=fused,
        parallel=parallel,
        devices=devices,
        quiet=True,
    )
    assert int(state.step) == -(-STEPS * BATCH // batch_size)
    return jax.device_get(state.params)


MULTIHOST_CASES = [  # (family, launcher, fused)
    ("mlp", "shard_map", False),
    ("lstm", "shard_map", False),
    ("mlp", "pmap", False),
    ("mlp", "shard_map", True),
    ("mlp", "pmap", True),
]


def case_name(family: str, launcher: str, fused: bool) -> str:
    return f"{family}_{launcher}{'_fused' if fused else ''}"


def main(port, num_processes, process_id, local_devices, out_dir, timeout_s="30"):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import fml
    from fml import rundir

    try:
        fml.parallel.initialize(
            f"127.0.0.1:{port}", int(num_processes), int(process_id), timeout_s=float(timeout_s)
        )
    except fml.FmlError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 3
    for family, launcher, fused in MULTIHOST_CASES:
        params = train(family, launcher, fused)
        rundir.save_run(
            os.path.join(out_dir, case_name(family, launcher, fused)),
            model=families()[family],
            params=params,
            config={"input_shape": list(data()[0].shape[1:]), "process": int(process_id)},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
