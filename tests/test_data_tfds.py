"""tensorflow-datasets loading: mocked sets (`tfds.testing.mock_data`), sets prepared
on disk in both file formats, streaming from disk, and the offline failure."""

import shutil
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import fml
from fml.data import ArraySource, BatchStream
from fml.errors import DataError, MissingDependencyError, UnknownNameError

N_TRAIN, N_TEST = 48, 16


def _raw_split(builder, split):
    """The split's (image, label) arrays exactly as TFDS yields them."""
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    pairs = list(tfds.as_numpy(ds))
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.mark.parametrize(
    "name, shape, classes",
    [("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)],
)
def test_mocked_set_shapes_dtypes_ranges_and_metadata(name, shape, classes):
    with tfds.testing.mock_data(num_examples=N_TRAIN):
        data = fml.data.load(name, validation=0.25, seed=0)
        raw_x, raw_y = _raw_split(tfds.builder(name), "test")
        info = tfds.builder(name).info
    assert data.input_shape == shape and data.task == "classification"
    assert data.x_train.shape == (36, *shape) and data.x_val.shape == (12, *shape)
    assert data.x_test.shape == (N_TRAIN, *shape)
    for x in (data.x_train, data.x_val, data.x_test):
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    for y in (data.y_train, data.y_val, data.y_test):
        assert y.dtype == np.int32 and y.min() >= 0 and y.max() < classes
    np.testing.assert_array_equal(data.x_test, raw_x.astype(np.float32) / np.float32(255.0))
    np.testing.assert_array_equal(data.y_test, raw_y)
    assert data.x_test.max() > 0.9  # the mock's uint8 range 0..255 is really scaled
    assert data.num_classes == classes == info.features["label"].num_classes
    assert data.info["classes"] == info.features["label"].names
    assert data.info["input_shape"] == list(shape)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small 'mnist' prepared on disk as `tfds build` would, in both file formats."""
    rng = np.random.default_rng(0)
    splits = {
        "train": rng.integers(0, 256, (N_TRAIN, 28, 28, 1), dtype=np.uint8),
        "test": rng.integers(0, 256, (N_TEST, 28, 28, 1), dtype=np.uint8),
    }
    labels = {s: rng.integers(0, 10, len(v)) for s, v in splits.items()}
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
    )
    dirs = {}
    for file_format in ("tfrecord", "array_record"):
        dirs[file_format] = tmp_path_factory.mktemp(file_format)
        tfds.dataset_builders.store_as_tfds_dataset(
            "mnist",
            "3.0.1",
            features,
            {
                s: [
                    (i, {"image": img, "label": int(lab)})
                    for i, (img, lab) in enumerate(zip(v, labels[s]))
                ]
                for s, v in splits.items()
            },
            data_dir=dirs[file_format],
            file_format=file_format,
            disable_shuffling=True,
        )
    return dirs, splits, labels


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_prepared_set_loads_its_exact_records(prepared, file_format):
    dirs, images, labels = prepared
    data = fml.data.load("mnist", data_dir=str(dirs[file_format]))
    np.testing.assert_array_equal(data.x_train, images["train"] / np.float32(255.0))
    np.testing.assert_array_equal(data.y_train, labels["train"])
    np.testing.assert_array_equal(data.x_test, images["test"] / np.float32(255.0))
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    sliced = fml.data.load("mnist", data_dir=str(dirs[file_format]), split=("train[:25%]", "test"))
    assert len(sliced.x_train) == N_TRAIN // 4


def test_streaming_from_disk_equals_streaming_the_loaded_arrays(prepared):
    dirs, _, _ = prepared
    source = fml.data.tfds_source("mnist", split="train", data_dir=str(dirs["array_record"]))
    assert len(source) == N_TRAIN and source.input_shape == (28, 28, 1)
    data = fml.data.load("mnist", data_dir=str(dirs["array_record"]))
    from_disk = BatchStream(
        source, batch_size=10, seed=2, epochs=2, process_index=1, process_count=2
    )
    in_memory = BatchStream(
        ArraySource(data.x_train, data.y_train),
        batch_size=10,
        seed=2,
        epochs=2,
        process_index=1,
        process_count=2,
    )
    count = 0
    for a, b in zip(from_disk, in_memory, strict=True):
        for k in ("x", "y", "mask"):
            np.testing.assert_array_equal(jax.device_get(a[k]), jax.device_get(b[k]))
        count += 1
    assert count == 2 * 5


def test_streaming_a_tfrecord_set_says_to_prepare_array_record(prepared):
    dirs, _, _ = prepared
    with pytest.raises(DataError, match="tfrecord"):
        fml.data.tfds_source("mnist", data_dir=str(dirs["tfrecord"]))


def test_missing_set_fails_fast_with_one_clear_message(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("fml must never try to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    started = time.perf_counter()
    for read in (
        lambda: fml.data.load("cifar10", data_dir=str(tmp_path)),
        lambda: fml.data.tfds_source("cifar10", data_dir=str(tmp_path)),
    ):
        with pytest.raises(DataError) as caught:
            read()
        message = str(caught.value)
        assert "'cifar10' is not prepared in" in message and str(tmp_path) in message
        assert "tfds build cifar10" in message and "mnist1d" in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert time.perf_counter() - started < 30  # a guard against a hang, not a speed target


def test_unknown_name_lists_embedded_sets():
    with pytest.raises(UnknownNameError, match="tensorflow-datasets name.*list_builders"):
        fml.data.load("no_such_set_anywhere")


def test_missing_tensorflow_datasets_names_the_tf_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(MissingDependencyError, match=r"fml\[tf\]"):
        fml.data.load("mnist")


def test_embedded_sets_keep_their_behaviour():
    data = fml.data.load("digits", validation=0.2, seed=1)
    direct = fml.data.load_embedded("digits", validation=0.2, seed=1)
    np.testing.assert_array_equal(data.x_train, direct.x_train)
    assert data.x_train.shape == (1149, 8, 8, 1) and data.x_val.shape == (288, 8, 8, 1)
    with pytest.raises(fml.errors.ConfigError, match="fixed splits"):
        fml.data.load("digits", split=("train[:10%]", "test"))
    with pytest.raises(fml.errors.ConfigError, match=r"\(train, test\) pair"):
        fml.data.load("mnist", split="train")


def test_grain_workers_stream_array_record_like_the_loaded_arrays(prepared):
    dirs, _, _ = prepared
    source = fml.data.tfds_source("mnist", split="train", data_dir=str(dirs["array_record"]))
    data = fml.data.load("mnist", data_dir=str(dirs["array_record"]))
    options = dict(batch_size=8, seed=4, epochs=2, process_index=0, process_count=2)
    from_disk = fml.data.stream(source, workers=2, **options)
    in_memory = BatchStream(ArraySource(data.x_train, data.y_train), **options)
    count = 0
    for a, b in zip(from_disk, in_memory, strict=True):
        for k in ("x", "y", "mask"):
            np.testing.assert_array_equal(jax.device_get(a[k]), jax.device_get(b[k]))
        count += 1
    assert count == 2 * N_TRAIN // 8


@pytest.mark.parametrize("at", [0.3, 0.5])
def test_a_corrupt_array_record_file_names_the_file_and_the_record(prepared, tmp_path, at):
    dirs, _, _ = prepared
    shutil.copytree(dirs["array_record"], tmp_path, dirs_exist_ok=True)
    (path,) = tmp_path.glob("mnist/3.0.1/mnist-train.array_record-*")
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    source = fml.data.tfds_source("mnist", split="train", data_dir=str(tmp_path))
    with pytest.raises(
        DataError, match=rf"record \d+ \(file {path}, record \d+ of it\) is corrupt"
    ):
        for start in range(0, N_TRAIN, 8):
            source.read(np.arange(start, start + 8))


def test_an_array_record_stream_trains_under_shard_map_with_checkpoints(prepared, tmp_path):
    dirs, _, _ = prepared
    data = fml.data.load("mnist", data_dir=str(dirs["array_record"]))
    source = fml.data.tfds_source("mnist", split="train", data_dir=str(dirs["array_record"]))
    model = fml.models.mlp([8, 10])
    options = dict(epochs=2, seed=5, optimizer="sgd", learning_rate=0.1, quiet=True)
    in_memory, h1 = fml.fit(model, (data.x_train, data.y_train), batch_size=8, **options)
    stream = fml.data.stream(source, batch_size=8, seed=5, workers=2)
    streamed, h2 = fml.fit(
        model, stream, parallel="shard_map", checkpoint_dir=tmp_path / "run", **options
    )
    stream.close()
    for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(in_memory.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    np.testing.assert_allclose(h2["train_loss"], h1["train_loss"], rtol=1e-5)
    assert fml.checkpoint.latest_step(tmp_path / "run") == 2 * N_TRAIN // 8
