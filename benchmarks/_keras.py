"""Keras 3 on the TensorFlow backend, run in its own process (`KERAS_BACKEND`
must be set before keras is imported): `python -m benchmarks._keras WORKLOAD
REPEATS [--quick]` prints one `Timing` as JSON on its last line."""

import json
import os
import pathlib
import subprocess
import sys
import time

from benchmarks._harness import Timing
from benchmarks._workloads import LSTM_HIDDEN, NUM_CLASSES, WORKLOADS, Workload, shrink


def _keras_model(workload: Workload):
    import keras
    from keras import layers

    stack = [keras.Input(workload.input_shape)]
    if workload.name == "mlp":
        stack.append(layers.Dense(128, activation="relu"))
    elif workload.name == "cnn":
        stack += [
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
        ]
    elif workload.name == "lstm":
        stack.append(layers.LSTM(LSTM_HIDDEN))
    stack.append(layers.Dense(NUM_CLASSES))
    return keras.Sequential(stack)


def keras_timing(workload: Workload, repeats: int) -> Timing:
    """Times `model.fit`: epoch 1 compiles, the next `repeats` epochs are timed."""
    import keras

    from benchmarks._workloads import synthetic_data

    x, y = synthetic_data(workload)
    model = _keras_model(workload)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-8),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ends = []

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    epochs = 2 + repeats * workload.passes  # first (compile) + one warm-up + timed
    started = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=workload.batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[EpochClock()],
    )
    epoch_s = [b - a for a, b in zip([started, *ends[:-1]], ends)]
    timed = epoch_s[2:]
    seconds = [sum(timed[i : i + workload.passes]) for i in range(0, len(timed), workload.passes)]
    steady = sorted(epoch_s[2:])[len(epoch_s[2:]) // 2]
    note = f"model.fit, jit_compile={model.jit_compile}, keras {keras.__version__}"
    return Timing(
        workload.name,
        "Keras 3 (TF)",
        note,
        seconds,
        workload.samples_per_repeat,
        epoch_s[0],
        epoch_s[0] - steady,
    )


def run_in_subprocess(workload_name: str, repeats: int, quick: bool) -> Timing | str:
    """Runs `keras_timing` in a fresh process with the TF backend; an error
    message instead of a `Timing` if that process fails."""
    root = str(pathlib.Path(__file__).resolve().parents[1])  # `benchmarks` importable there
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": path,
    }
    command = [sys.executable, "-m", "benchmarks._keras", workload_name, str(repeats)]
    done = subprocess.run(
        command + (["--quick"] if quick else []), env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        return f"keras process failed: {done.stderr.strip().splitlines()[-1:]}"
    return Timing.from_json(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv):
    workload = WORKLOADS[argv[0]]
    workload = shrink(workload) if "--quick" in argv else workload
    print(json.dumps(keras_timing(workload, int(argv[1])).to_json()))


if __name__ == "__main__":
    main(sys.argv[1:])
