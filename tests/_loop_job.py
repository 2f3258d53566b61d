"""One configuration of the composition matrix, run as its own process.

`python tests/_loop_job.py CONFIG.json` trains the configuration that
`tests/test_loop.py` describes in CONFIG.json (data source, launcher, fused,
run directory, and optionally the step at which the process SIGKILLs itself,
and the multi-process settings), then writes the final params to `out` if
given. The same module builds the data and the `fit` call for the test itself.
"""

import json
import os
import pathlib
import signal
import sys

import numpy as np

N, FEATURES, CLASSES, BATCH, EPOCHS = 60, 784, 10, 16, 2


def images(seed: int = 0):
    """The matrix's data: N uint8 28x28x1 images and labels."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (N, 28, 28, 1), dtype=np.uint8),
        rng.integers(0, CLASSES, N).astype(np.int64),
    )


def arrays():
    """The images as fml trains on them: float32 in [0, 1], int32 labels."""
    x, y = images()
    return x.astype(np.float32) / np.float32(255.0), y.astype(np.int32)


def data_for(config: dict):
    """What `fit` takes for the configuration's source."""
    import fml

    kind = config["source"]
    if kind == "arrays":
        return arrays()
    if kind == "parquet":  # part-files read by 2 Grain worker processes
        source = fml.data.parquet_source(
            config["paths"]["parquet"], features="pixels", label="label", shape=(28, 28, 1)
        )
        return fml.data.stream(source, batch_size=BATCH, seed=SETTINGS["seed"], workers=2)
    if kind == "memmap":
        x = np.load(config["paths"]["x"], mmap_mode="r")
        y = np.load(config["paths"]["y"], mmap_mode="r")
        source = fml.data.ArraySource(x, y)
    else:
        source = fml.data.tfds_source("mnist", split="train", data_dir=config["paths"]["tfds"])
    return fml.data.BatchStream(source, batch_size=BATCH, seed=SETTINGS["seed"])


SETTINGS = {
    "optimizer": "adam",
    "learning_rate": 1e-2,
    "epochs": EPOCHS,
    "batch_size": BATCH,
    "seed": 1,
    "quiet": True,
}


def fit(config: dict, **kwargs):
    """`fml.fit` of the configuration (the killed, the resumed and the reference run)."""
    import fml

    model = fml.models.mlp([16, CLASSES])
    return fml.fit(
        model,
        data_for(config),
        fused=config["fused"],
        parallel=config["parallel"],
        **SETTINGS,
        **kwargs,
    )


class KillAt:
    """SIGKILLs this process when the run reaches `step` (before it is checkpointed)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_begin(self, loop):
        pass

    def restore(self, loop):
        return None

    def next_stop(self, loop, step):
        return self.step

    def on_steps(self, loop, first_step, metrics):
        if loop.step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_end(self, loop, epoch, logs):
        pass

    def on_train_end(self, loop):
        pass

    def close(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def main(path: str) -> None:
    config = json.loads(pathlib.Path(path).read_text())
    if config.get("processes"):
        import fml

        fml.parallel.initialize(
            f"127.0.0.1:{config['port']}",
            config["processes"],
            config["process_id"],
            timeout_s=60,
        )
    from fml.rundir import flatten_params

    extra = [KillAt(config["kill_at"])] if config.get("kill_at") is not None else []
    state, _ = fit(
        config,
        checkpoint_dir=config["run_dir"],
        checkpoint_every=1,
        keep=2,
        resume=True,
        callbacks=extra,
    )
    if config.get("out") and config.get("process_id", 0) == 0:
        np.savez(config["out"], **flatten_params(state.params))


if __name__ == "__main__":
    main(sys.argv[1])
