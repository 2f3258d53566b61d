"""Does the input pipeline keep up with the train step?

Measures, on this machine and in one run, samples/second of
  - the jitted train step alone (one batch already on the device, repeated),
    for the MNIST-sized MLP (784-256-256-10) and the seed MNIST CNN;
  - the input pipeline alone (read, shuffle, batch, prefetch, `device_put`):
    `fml.data.BatchStream` (reader threads) from in-memory arrays and from a TFDS
    set on disk (ArrayRecord, PNG images as `tfds build mnist
    --file_format=array_record` writes them); `fml.data.stream` on Grain with
    worker processes from the same ArrayRecord set and from Parquet part-files;
    and `tf.data` (TFDS's `as_dataset` of the same set as TFRecord, parallel
    decode, shuffle buffer, prefetch), the anchor users know;
  - training fed by each pipeline (what `fit` does), against the step alone;
  - the CPU seconds one process spends decoding a record (what bounds a
    pipeline on few cores).
Reports medians of repeats with the spread (min-max) and the ratio pipeline / step;
the target is >= 5x (the device never waits for input).

  python benchmarks/bench_input.py [--batch-size 128] [--repeats 5] [--quick]
"""

import argparse
import itertools
import os
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


def write_tfds_set(images, labels, data_dir: str, file_format: str = "array_record"):
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
        data_dir=data_dir, file_format=file_format,
    )  # fmt: skip


def write_parquet_parts(images, labels, out_dir: str, parts: int = 4) -> str:
    """The images as Spark writes a table: part-files of pixel lists (float32 in
    [0, 1]) and an int label, row groups of 1024 rows, a `_SUCCESS` marker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = (images.reshape(len(images), -1) / np.float32(255)).astype(np.float32)
    width = pixels.shape[1]
    for p, rows in enumerate(np.array_split(np.arange(len(images)), parts)):
        values = pa.array(pixels[rows].reshape(-1))
        table = pa.table(
            {"pixels": pa.FixedSizeListArray.from_arrays(values, width), "label": labels[rows]}
        )
        pq.write_table(table, f"{out_dir}/part-{p:05d}-0-c000.snappy.parquet", row_group_size=1024)
    open(os.path.join(out_dir, "_SUCCESS"), "w").close()
    return out_dir


def tf_data_batches(data_dir: str, batch_size: int):
    """`tf.data` over the TFRecord copy: TFDS decoding in parallel, a 10,000-example
    shuffle buffer (not fml's global order), batches scaled to [0, 1], prefetched."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = tfds.builder("mnist", data_dir=data_dir).as_dataset(
        split="train", as_supervised=True, shuffle_files=True,
        read_config=tfds.ReadConfig(num_parallel_calls_for_decode=tf.data.AUTOTUNE),
    )  # fmt: skip
    ds = ds.repeat().shuffle(10_000, seed=0).batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, tf.cast(y, tf.int32)))
    mask = np.ones(batch_size, np.float32)
    for x, y in tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)):
        yield jax.device_put({"x": x, "y": y, "mask": mask})


def decode_cpu_per_record(source, batch_size: int, batches: int = 20) -> float:
    """CPU seconds this process spends per record reading shuffled batches of `source`."""
    order = np.random.default_rng(0).permutation(len(source))
    batches = min(batches, len(source) // batch_size)
    source.read(order[:batch_size])  # warm: open files, build decoders
    started = time.process_time()
    for i in range(batches):
        source.read(order[i * batch_size : (i + 1) * batch_size])
    return (time.process_time() - started) / (batches * batch_size)


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


def stream_run(make_batches, steps: int):
    """Reads `steps` batches through the pipeline onto the device."""
    batches = iter(make_batches())

    def run():
        for batch in itertools.islice(batches, steps):
            jax.block_until_ready(batch)

    return run


def fed_run(step, state, make_batches, steps: int):
    """Runs `steps` train steps fed by the pipeline, as `fit` does."""
    batches = iter(make_batches())

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
    parser.add_argument(
        "--workers", type=int, default=2, help="reader threads and Grain processes to compare"
    )
    parser.add_argument("--only", nargs="*", help="run only the pipelines whose label has one")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.disk_examples, args.steps, args.repeats = 2000, 500, 5, 2

    images, labels = synthetic_mnist(args.examples)
    memory = ArraySource(images / np.float32(255), labels)
    b, s, r, w = args.batch_size, args.steps, args.repeats, args.workers
    with tempfile.TemporaryDirectory() as data_dir:
        disk_images, disk_labels = images[: args.disk_examples], labels[: args.disk_examples]
        write_tfds_set(disk_images, disk_labels, f"{data_dir}/ar")
        write_tfds_set(disk_images, disk_labels, f"{data_dir}/tfr", file_format="tfrecord")
        os.makedirs(f"{data_dir}/parquet")
        write_parquet_parts(disk_images, disk_labels, f"{data_dir}/parquet")
        disk = fml.data.tfds_source("mnist", split="train", data_dir=f"{data_dir}/ar")
        parquet = fml.data.parquet_source(
            f"{data_dir}/parquet", features="pixels", label="label", shape=SHAPE
        )

        def threads(source, workers):
            return lambda: BatchStream(source, batch_size=b, seed=0, workers=workers)

        def grain(source, workers):
            return lambda: fml.data.stream(source, batch_size=b, seed=0, workers=workers)

        pipelines = {
            "in-memory, 1 thread": threads(memory, 1),
            "ArrayRecord, 1 thread": threads(disk, 1),
            f"ArrayRecord, {w} threads": threads(disk, w),
            f"ArrayRecord, Grain {w} processes": grain(disk, w),
            "Parquet, Grain in-process": grain(parquet, 0),
            f"Parquet, Grain {w} processes": grain(parquet, w),
            "TFRecord, tf.data AUTOTUNE": lambda: tf_data_batches(f"{data_dir}/tfr", b),
        }
        if args.only:
            pipelines = {k: v for k, v in pipelines.items() if any(o in k for o in args.only)}
        decode = {
            "ArrayRecord (PNG)": decode_cpu_per_record(disk, b),
            "Parquet": decode_cpu_per_record(parquet, b),
        }
        runs = {f"pipeline, {label}": stream_run(make, s) for label, make in pipelines.items()}
        models = {
            "MLP 784-256-256-10": fml.models.mlp([256, 256, 10]),
            "CNN (mnist_cnn)": mnist_cnn(),
        }
        for name, model in models.items():
            step, fresh_state = compiled_step(model)
            runs[f"step alone, {name}"] = step_run(step, fresh_state(), b, s)
            for label, make in pipelines.items():
                runs[f"  fed, {name}, {label}"] = fed_run(step, fresh_state(), make, s)
        rates = interleaved_rates(runs, b * s, r)
    print(
        f"samples/second, batch {b}, {s} steps x {r} interleaved repeats: median (min - max); "
        f"{jax.devices()[0].platform}, {jax.device_count()} device(s)"
    )
    for label, figures in rates.items():
        print(show(label, figures))
    for name in models:
        step = rates[f"step alone, {name}"][0]
        for label in pipelines:
            print(
                f"{name}, {label}: pipeline / step = {rates[f'pipeline, {label}'][0] / step:.1f}x "
                f"(target >= 5x), fed / alone = {rates[f'  fed, {name}, {label}'][0] / step:.2f}"
            )
    for label, seconds in decode.items():
        print(
            f"decode CPU per record, {label}: {seconds * 1e6:.1f} us in one process = at most "
            f"{1 / seconds:,.0f} samples/s per core"
        )


if __name__ == "__main__":
    main()
