"""Checks of a stream's options, before anything is read or placed."""

import numbers

from fml.errors import ConfigError


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_stream_options(
    source,
    *,
    seed,
    drop_remainder,
    epochs,
    position,
    process_index,
    process_count,
    prefetch,
    workers,
) -> None:
    """Raises `ConfigError` naming the first option of a `BatchStream` that is not valid
    (`shard_bounds` checks `process_index < process_count`)."""
    if not (hasattr(source, "read") and hasattr(source, "__len__")):
        raise ConfigError(
            f"expected a source with __len__ and read(index_B), got {type(source).__name__}"
        )
    checks = [
        ("seed", seed, _is_int(seed), "an int"),
        ("drop_remainder", drop_remainder, isinstance(drop_remainder, bool), "a bool"),
        ("epochs", epochs, epochs is None or _is_int(epochs) and epochs >= 0, "None or an int >= 0"),
        (
            "position",
            position,
            isinstance(position, tuple | list) and len(position) == 2
            and all(_is_int(p) for p in position),
            "an (epoch, step) pair of ints",
        ),
        ("prefetch", prefetch, _is_int(prefetch) and prefetch >= 0, "an int >= 0"),
        ("workers", workers, _is_int(workers) and workers >= 1, "an int >= 1"),
        (
            "process_count",
            process_count,
            process_count is None or _is_int(process_count) and process_count >= 1,
            "None or an int >= 1",
        ),
        (
            "process_index",
            process_index,
            process_index is None or _is_int(process_index) and process_index >= 0,
            "None or an int >= 0",
        ),
    ]  # fmt: skip
    for name, value, ok, what in checks:
        if not ok:
            raise ConfigError(f"expected {name} to be {what}, got {value!r}")
