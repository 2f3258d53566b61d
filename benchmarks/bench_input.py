"""Does the input pipeline keep up with the train step?

Measures, on this machine and in one run, samples/second of
  - the jitted train step alone (one batch already on the device, repeated),
    for the MNIST-sized MLP (784-256-256-10) and the seed MNIST CNN;
  - `fml.data.BatchStream` alone (read, shuffle, batch, prefetch, `device_put`),
    from in-memory arrays and from a TFDS set on disk (ArrayRecord, PNG images as
    `tfds build mnist --file_format=array_record` writes them);
  - training fed by the stream (what `fit` does), against the step alone.
Reports medians of repeats with the spread (min-max) and the ratio pipeline / step;
the target is >= 5x (the device never waits for input).

  python benchmarks/bench_input.py [--batch-size 128] [--repeats 5] [--quick]
"""

import argparse
import itertools
import statistics
import tempfile
import time

import jax
import numpy as np

import fml
from fml.data import ArraySource, BatchStream
from fml.models.presets import mnist_cnn

SHAPE = (28, 28, 1)


def synthetic_mnist(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    return images, rng.integers(0, 10, n).astype(np.int32)


def write_tfds_set(images, labels, data_dir: str):
    """An MNIST-shaped TFDS set on disk in the ArrayRecord format (no network needed)."""
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=SHAPE),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
    )
    examples = [(i, {"image": x, "label": int(y)}) for i, (x, y) in enumerate(zip(images, labels))]
    tfds.dataset_builders.store_as_tfds_dataset(
        "mnist", "3.0.1", features, {"train": examples, "test": examples[:100]},
        data_dir=data_dir, file_format="array_record",
    )  # fmt: skip


def interleaved_rates(runs: dict, samples: int, repeats: int) -> dict:
    """Samples/second (median, min, max) of each `run()`, after one warm-up call each;
    the runs take turns within each repeat so that load from other jobs on the
    machine falls on all of them alike."""
    for run in runs.values():
        run()
    seconds = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[label].append(time.perf_counter() - started)
    rates = {label: [samples / t for t in times] for label, times in seconds.items()}
    return {label: (statistics.median(r), min(r), max(r)) for label, r in rates.items()}


def compiled_step(model):
    """The jitted train step of `model` and a function giving a fresh state."""
    tx = fml.train.make_optimizer("adam", 1e-3)
    step = jax.jit(
        fml.train.make_train_step(model, fml.train.make_objective(model), tx), donate_argnums=0
    )
    return step, lambda: fml.train.init_state(model, tx, SHAPE)


def step_run(step, state, batch_size: int, steps: int):
    """Runs `steps` train steps on one batch already on the device."""
    x, y = synthetic_mnist(batch_size)
    batch = jax.device_put(
        {"x": x / np.float32(255), "y": y, "mask": np.ones(batch_size, np.float32)}
    )

    def run():
        nonlocal state
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)

    return run


def stream_run(source, workers: int, batch_size: int, steps: int):
    """Reads `steps` batches through the pipeline onto the device."""
    batches = iter(BatchStream(source, batch_size=batch_size, seed=0, workers=workers))

    def run():
        for batch in itertools.islice(batches, steps):
            jax.block_until_ready(batch)

    return run


def fed_run(step, state, source, workers: int, batch_size: int, steps: int):
    """Runs `steps` train steps fed by the pipeline, as `fit` does."""
    batches = iter(BatchStream(source, batch_size=batch_size, seed=0, workers=workers))

    def run():
        nonlocal state
        for batch in itertools.islice(batches, steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)

    return run


def show(label: str, figures) -> str:
    median, low, high = figures
    return f"{label:<52} {median:>12,.0f}   ({low:,.0f} - {high:,.0f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--examples", type=int, default=60_000)
    parser.add_argument("--disk-examples", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="reader threads to compare")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.disk_examples, args.steps, args.repeats = 2000, 500, 5, 2

    images, labels = synthetic_mnist(args.examples)
    memory = ArraySource(images / np.float32(255), labels)
    with tempfile.TemporaryDirectory() as data_dir:
        write_tfds_set(images[: args.disk_examples], labels[: args.disk_examples], data_dir)
        disk = fml.data.tfds_source("mnist", split="train", data_dir=data_dir)
        b, s, r = args.batch_size, args.steps, args.repeats
        sources = {
            "in-memory": (memory, 1),
            "TFDS ArrayRecord on disk": (disk, 1),
            f"TFDS ArrayRecord on disk, {args.workers} workers": (disk, args.workers),
        }
        runs = {f"pipeline, {label}": stream_run(*src, b, s) for label, src in sources.items()}
        models = {
            "MLP 784-256-256-10": fml.models.mlp([256, 256, 10]),
            "CNN (mnist_cnn)": mnist_cnn(),
        }
        for name, model in models.items():
            step, fresh_state = compiled_step(model)
            runs[f"step alone, {name}"] = step_run(step, fresh_state(), b, s)
            for label, src in sources.items():
                runs[f"  fed, {name}, {label}"] = fed_run(step, fresh_state(), *src, b, s)
        rates = interleaved_rates(runs, b * s, r)
    print(
        f"samples/second, batch {b}, {s} steps x {r} interleaved repeats: median (min - max); "
        f"{jax.devices()[0].platform}, {jax.device_count()} device(s)"
    )
    for label, figures in rates.items():
        print(show(label, figures))
    for name in models:
        step = rates[f"step alone, {name}"][0]
        for label in sources:
            print(
                f"{name}, {label}: pipeline / step = {rates[f'pipeline, {label}'][0] / step:.1f}x "
                f"(target >= 5x), fed / alone = {rates[f'  fed, {name}, {label}'][0] / step:.2f}"
            )


if __name__ == "__main__":
    main()
