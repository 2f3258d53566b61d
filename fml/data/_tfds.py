"""tensorflow-datasets sets: whole splits in memory (`load_tfds`) or random-access
records for streaming (`tfds_source`). Never downloads: a set must be prepared in
`data_dir` first (`tfds build` on a machine with a network)."""

import contextlib
import functools

import numpy as np

from fml import preprocessing
from fml.errors import ConfigError, DataError, FmlError, UnknownNameError, require, unknown

_READ_CHUNK = 4096


def _tfds():
    return require("tensorflow_datasets", "tf")


def _not_prepared(name: str, builder, embedded) -> DataError:
    return DataError(
        f"tensorflow-datasets set {name!r} is not prepared in {builder.data_dir} "
        f"(data_dir {builder.data_dir_root}) and fml never downloads. Prepare it on a "
        f"machine with a network: `tfds build {name} --data_dir=DIR` (add "
        f"`--file_format=array_record` to stream it with fml.data.tfds_source), copy DIR "
        f"here and pass data_dir=DIR (or set TFDS_DATA_DIR). Offline, use an embedded "
        f"set: {', '.join(sorted(embedded))}."
    )


def _builder(name: str, data_dir):
    """The TFDS builder of `name`, or `UnknownNameError` when TFDS has no such set."""
    from fml.data._embedded import EMBEDDED

    if not isinstance(name, str) or not name:
        raise unknown("data set", name, EMBEDDED)
    tfds = _tfds()
    try:
        return tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError, AssertionError) as e:
        # ValueError: not a "name[/config][:version]"; AssertionError: no such version.
        raise UnknownNameError(
            f"unknown data set {name!r}; expected an embedded set ({', '.join(sorted(EMBEDDED))}) "
            f"or a tensorflow-datasets name (see `tfds.list_builders()`): {str(e)[:200]}"
        ) from None


def _reading(name: str, builder, read):
    """Calls `read()`; a failure of a set that is not prepared becomes one clear
    `DataError` instead of TensorFlow's stack."""
    from fml.data._embedded import EMBEDDED

    try:
        return read()
    except (AssertionError, ValueError, NotImplementedError, OSError) as e:
        if builder.is_prepared():
            raise DataError(f"tensorflow-datasets set {name!r}: {e}") from e
        raise _not_prepared(name, builder, EMBEDDED) from None


@contextlib.contextmanager
def _damaged_set_errors(name: str, data_dir):
    """Any other failure while opening or reading a set becomes a `DataError` naming
    the set and its directory: for a damaged `dataset_info.json`, `features.json` or
    record file TFDS raises protobuf's `ParseError`, `RuntimeError`, `KeyError` or
    TensorFlow's errors."""
    try:
        yield
    except FmlError:
        raise
    except Exception as e:
        where = data_dir if data_dir is not None else "TFDS's data_dir (TFDS_DATA_DIR)"
        raise DataError(
            f"tensorflow-datasets set {name!r} in {where} cannot be read (its "
            f"dataset_info.json, features.json or records are damaged; rebuild it with "
            f"`tfds build`): {type(e).__name__}: {str(e)[:300]}"
        ) from e


class _Decoder:
    """Turns TFDS examples into fml's arrays: inputs float32 (images scaled to [0, 1]),
    class labels int32 (or float32 regression targets)."""

    def __init__(self, name: str, info):
        tfds = _tfds()
        keys = info.supervised_keys
        if not (
            isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
        ):
            raise DataError(
                f"tensorflow-datasets set {name!r} has supervised keys {keys!r}; fml reads "
                "sets with one input feature and one label, like ('image', 'label')"
            )
        self.input_key, self.label_key = keys
        x_feature, y_feature = info.features[self.input_key], info.features[self.label_key]
        x_dtype = np.dtype(x_feature.np_dtype)
        if not (np.issubdtype(x_dtype, np.number) or x_dtype == np.bool_):
            raise DataError(
                f"tensorflow-datasets set {name!r}: input {self.input_key!r} is "
                f"{type(x_feature).__name__} of {x_dtype}; fml reads numeric inputs"
            )
        self.scale = 255.0 if isinstance(x_feature, tfds.features.Image) else None
        self.input_shape = tuple(x_feature.shape)
        self.features = info.features
        if isinstance(y_feature, tfds.features.ClassLabel):
            self.task, self.num_classes = "classification", y_feature.num_classes
            self.classes = list(y_feature.names)
        else:
            self.task, self.num_classes, self.classes = "regression", None, None

    def __getstate__(self) -> dict:
        # The compiled TF decoder does not pickle: each worker process builds its own.
        return {k: v for k, v in self.__dict__.items() if k != "_decode_serialized"}

    def __call__(self, x, y) -> dict:
        x = np.asarray(x, np.float32)
        if self.scale is not None:
            x /= np.float32(self.scale)
        y = np.asarray(y, np.int32 if self.task == "classification" else np.float32)
        return {"x": x, "y": y}

    def records(self, records: list) -> dict:
        """Decodes a batch of records: serialized bytes in one TF call (parse and
        image decoding in C++, outside the GIL), or examples already decoded."""
        if records and isinstance(records[0], bytes):
            decoded = self._decode_serialized(records)
            return self(decoded[self.input_key].numpy(), decoded[self.label_key].numpy())
        return self(
            np.stack([r[self.input_key] for r in records]),
            np.asarray([r[self.label_key] for r in records]),
        )

    @functools.cached_property
    def _decode_serialized(self):
        tf = require("tensorflow", "tf")
        features, spec = self.features, self.features.tf_example_spec

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def decode(serialized_B):
            return features.decode_batch_example(tf.io.parse_example(serialized_B, spec))

        return decode


class TfdsSource:
    """A TFDS split on disk (ArrayRecord format) as a random-access `Source`.

    `read(index_B)` reads and decodes only those records, so a `BatchStream` over
    it holds one batch at a time, whatever the split's size.
    """

    def __init__(self, name: str, data_source, decoder: _Decoder):
        self.name, self.data_source, self.decoder = name, data_source, decoder
        self.input_shape, self.num_classes = decoder.input_shape, decoder.num_classes
        self.task = decoder.task

    def __len__(self) -> int:
        return len(self.data_source)

    def _read(self, keys: list[int]) -> dict:
        read_many = getattr(self.data_source, "__getitems__", None)
        records = read_many(keys) if read_many else [self.data_source[k] for k in keys]
        return self.decoder.records(records)

    def read(self, index_B: np.ndarray) -> dict:
        keys = [int(i) for i in index_B]
        try:
            return self._read(keys)
        except Exception as e:  # Riegeli RuntimeError, TF InvalidArgumentError, ParseError
            raise self._corrupt(keys, e) from None

    def _corrupt(self, keys: list[int], error: Exception) -> DataError:
        """A `DataError` naming the first record of `keys` that fails alone, and its file."""
        for key in keys:
            try:
                self._read([key])
            except Exception as e:
                return DataError(
                    f"tensorflow-datasets set {self.name!r}: record {key} "
                    f"({_record_file(self.data_source, key)}) is corrupt: {type(e).__name__}: "
                    f"{str(e)[:300]}"
                )
        return DataError(
            f"tensorflow-datasets set {self.name!r}: reading records {keys[:8]}... failed: "
            f"{type(error).__name__}: {str(error)[:300]}"
        )

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} examples, input_shape={self.input_shape})"


def _record_file(data_source, key: int) -> str:
    """ "file F, record r" of the split's record `key`, from ArrayRecord's read
    instructions when the data source exposes them (else "file unknown")."""
    instructions = getattr(getattr(data_source, "data_source", None), "_read_instructions", None)
    for instruction in instructions or ():
        count = instruction.end - instruction.start
        if key < count:
            return f"file {instruction.filename}, record {instruction.start + key} of it"
        key -= count
    return "file unknown"


def _raw_records(name: str, builder, split: str):
    """The split's records as serialized bytes, by index (decoded in batches later)."""
    tfds = _tfds()
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    return _reading(name, builder, lambda: builder.as_data_source(split, deserialize_method=raw))


def tfds_source(name: str, *, split: str = "train", data_dir=None) -> TfdsSource:
    """A TFDS split as a random-access source for `fml.data.BatchStream`.

    The set must be prepared in `data_dir` in the ArrayRecord format
    (`tfds build NAME --file_format=array_record`); a set missing there raises
    `DataError` at once, naming where it looked and how to prepare it.

    Args:
      name: a tensorflow-datasets name, e.g. "mnist".
      split: a TFDS split, slicing included ("train[:90%]").
      data_dir: the TFDS data directory (default: TFDS's, `TFDS_DATA_DIR`).
    """
    with _damaged_set_errors(name, data_dir):
        builder = _builder(name, data_dir)
        decoder = _Decoder(name, builder.info)
        return TfdsSource(name, _raw_records(name, builder, split), decoder)


def _read_split(name: str, builder, decoder: _Decoder, split: str):
    """All of one split as arrays `(x, y)`."""
    tfds = _tfds()
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        source = TfdsSource(name, _raw_records(name, builder, split), decoder)
        chunks = [
            source.read(np.arange(start, min(start + _READ_CHUNK, len(source))))
            for start in range(0, len(source), _READ_CHUNK)
        ]
    else:
        ds = _reading(
            name,
            builder,
            lambda: builder.as_dataset(split=split, as_supervised=True, shuffle_files=False),
        )
        chunks = [decoder(x, y) for x, y in tfds.as_numpy(ds.batch(_READ_CHUNK))]
    if not chunks:
        raise DataError(f"tensorflow-datasets set {name!r}: split {split!r} has no examples")
    return tuple(np.concatenate([c[k] for c in chunks]) for k in ("x", "y"))


def load_tfds_arrays(name: str, *, split=("train", "test"), data_dir=None):
    """`(x_train, y_train, x_test, y_test, task, num_classes, info)` of a TFDS set."""
    if isinstance(split, str) or len(split) != 2:
        raise ConfigError(
            f"expected split as a (train, test) pair of TFDS split names, got {split!r}"
        )
    with _damaged_set_errors(name, data_dir):
        builder = _builder(name, data_dir)
        decoder = _Decoder(name, builder.info)
        x_train, y_train = _read_split(name, builder, decoder, split[0])
        x_test, y_test = _read_split(name, builder, decoder, split[1])
    info = {
        "source": f"tensorflow-datasets {name} {builder.info.version}, splits {list(split)}",
        "data_dir": str(builder.data_dir),
        "input_shape": list(decoder.input_shape),
        "classes": decoder.classes,
        "scaled": "uint8 / 255" if decoder.scale else None,
        "preprocessing": preprocessing.block(
            decoder.input_shape,
            [preprocessing.scale(1 / decoder.scale)] if decoder.scale else [],
            classes=decoder.classes,
        ),
    }
    return x_train, y_train, x_test, y_test, decoder.task, decoder.num_classes, info
