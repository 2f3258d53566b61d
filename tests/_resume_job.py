"""A small checkpointed training run, for the kill-and-resume test.

`python tests/_resume_job.py FAMILY RUN_DIR OUT.npz` trains FAMILY with
`resume=True` (so the same command starts the run and continues it), a
checkpoint every step, and writes the final params to OUT.npz. Each save is
followed by a short sleep so that a test can kill the run between steps.
"""

import os
import sys
import time

import numpy as np

# Tiny models and data: 48 examples, 6 steps per epoch, 2 epochs.
EPOCHS, BATCH, STEPS = 2, 8, 12


def model_and_data(family: str):
    import fml
    from fml.models import cnn, conv, dense, max_pool

    rng = np.random.default_rng(0)
    models = {
        "mlp": (fml.models.mlp([16, 3], dropout=0.1), (6,)),
        "cnn": (cnn([conv(4, 3), max_pool(2), dense(8)], num_classes=3), (8, 1)),
        "gru": (fml.models.rnn("gru", 8, num_classes=3), (5, 2)),
    }
    model, input_shape = models[family]
    x = rng.normal(size=(48, *input_shape)).astype(np.float32)
    y = rng.integers(0, 3, size=48).astype(np.int32)
    return model, (x, y)


def train(family: str, run_dir=None, *, resume: bool = False):
    """`fml.fit` with the settings both the killed and the reference run use."""
    import fml

    model, data = model_and_data(family)
    return fml.fit(
        model,
        data,
        optimizer="adam",
        learning_rate=1e-2,
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=3,
        fused=family == "cnn",  # one family through the fused (scan) epoch
        quiet=True,
        checkpoint_dir=run_dir,
        checkpoint_every=1 if run_dir else None,
        keep=2,
        resume=resume,
    )


def _slow_saves(seconds: float):
    from fml import checkpoint

    save = checkpoint.Checkpointer.save

    def slow_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        time.sleep(seconds)

    checkpoint.Checkpointer.save = slow_save


if __name__ == "__main__":
    family, run_dir, out = sys.argv[1:4]
    _slow_saves(float(os.environ.get("FML_TEST_SAVE_SLEEP", "0.1")))
    from fml.rundir import flatten_params

    state, _ = train(family, run_dir, resume=True)
    np.savez(out, **flatten_params(state.params))
