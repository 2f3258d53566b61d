"""Data parallelism with JAX's own runtime: one per-replica step, two launchers.

The step is `fml.train.make_train_step(..., axis_name="data")`: each replica
computes loss and gradient *sums* over its rows of the global batch, `psum`s
them and the example counts over the `"data"` axis, and divides, so every
replica applies the update of the whole global batch. Two launchers run it:

- `"shard_map"` (default): `jax.jit(jax.shard_map(step))` over a
  `Mesh(devices, ("data",))`, params replicated, the batch sharded on axis 0.
  It spans every process joined by `initialize`.
- `"pmap"`: `jax.pmap(step, axis_name="data")`, state stacked `[D, ...]`, batch
  `[D, B / D, ...]`.

A global batch whose size is not a multiple of the device count is padded
with copies of its first row that carry mask 0, so the loss, gradients and
metrics equal the unpadded ones (`pad_batch`).

Fused epochs (`fused=True`) never copy the data set to every device: each
epoch's batches are drawn on the host (`fml.batching`, the same batches as one
device), gathered there in batch order, and each device is given only its
columns of every batch, `[steps, batch / devices, ...]`, so it holds 1 / devices
of the data (`fml.runners.GatheredRunner`).

Many processes (hosts) join through `initialize`, a wrapper of
`jax.distributed.initialize` that reads its settings from arguments or the
environment of SLURM, Kubernetes (Kubeflow) and TPU pods, uses gloo collectives
on CPU, and fails within `timeout_s` with a clear message when the coordinator
cannot be reached. Then each process feeds its own rows of every global batch
(`jax.make_array_from_process_local_data`), and only process 0 writes.

Example:
  >>> import fml
  >>> data = fml.data.load("breast_cancer")
  >>> model = fml.models.mlp([16, 2])
  >>> state, history = fml.fit(model, data, epochs=2, batch_size=64, parallel="shard_map",
  ...                          quiet=True)
"""

import collections
import dataclasses
import functools
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fml import batching
from fml.data import ArraySource, BatchStream
from fml.errors import ConfigError, DistributedError, ShapeError, unknown
from fml.runners import GatheredRunner, HostRunner
from fml.step import make_batch_scan

AXIS = "data"
# An epoch's batches `[steps, batch, ...]`, each device holding its columns of each.
EPOCH_BATCHES = P(None, AXIS)
LAUNCHERS = ("shard_map", "pmap")


# ------------------------------------------------------------------ devices and meshes


def mesh_devices(devices=None) -> list:
    """The devices of a data mesh, grouped by process.

    Args:
      devices: None for every device of every process, an int `n` for the first
        `n` of them, or a sequence of `jax.Device`s.

    Returns:
      the devices sorted by `(process_index, id)`, so each process holds one
      contiguous block of every sharded batch.
    """
    available = jax.devices()
    if devices is None:
        chosen = list(available)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ConfigError(f"expected devices between 1 and {len(available)}, got {devices}")
        chosen = list(available[:devices])
    elif isinstance(devices, Sequence) and all(isinstance(d, jax.Device) for d in devices):
        chosen = list(devices)
        if not chosen or len(set(chosen)) != len(chosen):
            raise ConfigError(f"expected a non-empty list of distinct devices, got {chosen}")
    else:
        raise ConfigError(
            f"expected devices as None, an int or a list of jax.Device, got {devices!r}"
        )
    check_devices_per_process(chosen)
    return sorted(chosen, key=lambda d: (d.process_index, d.id))


def check_devices_per_process(devices) -> None:
    """Every process must bring the same number of devices (and at least one)."""
    counts = collections.Counter(d.process_index for d in devices)
    per_process = {p: counts.get(p, 0) for p in range(jax.process_count())}
    if len(set(per_process.values())) > 1:
        raise DistributedError(
            "data parallelism needs the same number of devices in every process; "
            f"got devices per process {per_process}"
        )


def data_mesh(devices=None) -> Mesh:
    """`Mesh(devices, ("data",))` over `mesh_devices(devices)`."""
    return Mesh(np.array(mesh_devices(devices)), (AXIS,))


def is_main_process() -> bool:
    """True in process 0, the only one that writes logs, metrics and files."""
    return jax.process_index() == 0


# ------------------------------------------------------------------ placing data


def pad_batch(batch: Mapping, multiple: int) -> dict:
    """Pads a batch to a multiple of `multiple` rows with copies of row 0, mask 0.

    Works on numpy and (traced) jax arrays alike. The padded rows contribute
    nothing to the loss, gradients or metrics of `make_train_step`.
    """
    batch = dict(batch)
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ShapeError(f"expected batch arrays with one leading size, got {sizes}")
    size = next(iter(sizes.values()))
    padded = -(-size // multiple) * multiple
    if padded == size:
        return batch
    rows = np.concatenate([np.arange(size), np.zeros(padded - size, np.int32)])
    out = {k: v[rows] for k, v in batch.items()}
    out["mask"] = out["mask"] * (np.arange(padded) < size).astype(np.float32)
    return out


def process_rows(mesh: Mesh, num_rows: int) -> slice:
    """The rows of a `[num_rows, ...]` array sharded over `mesh` that this process holds."""
    sharding = NamedSharding(mesh, P(AXIS))
    starts = sorted(
        index[0].start or 0
        for index in sharding.addressable_devices_indices_map((num_rows,)).values()
    )
    per_device = num_rows // mesh.size
    return slice(starts[0], starts[-1] + per_device)


def local_mesh(mesh: Mesh) -> Mesh:
    """The part of `mesh` on this process's devices (pmap's view of its arguments)."""
    return Mesh(np.array(mesh.local_devices), (AXIS,))


def shard_batch(batch: Mapping, mesh: Mesh, *, stacked: bool = False) -> dict:
    """A batch of this process's rows, placed for the step.

    Each process passes its own rows (in one process: the whole batch); every
    process must pass the same number. Rows are padded with mask 0 up to a
    multiple of the local device count (`pad_batch`); a batch without "mask"
    gets a mask of ones.

    Args:
      batch: `{"x": [b, ...], "y": [b, ...], "mask": [b]}` (numpy or jax arrays).
      mesh: a data mesh (`data_mesh`).
      stacked: for `pmap`: this process's arrays `[local devices, rows per
        device, ...]`, as pmap takes them, instead of global arrays `[B, ...]`
        sharded over the whole mesh (built with
        `jax.make_array_from_process_local_data`) for `shard_map`.
    """
    batch = {"mask": np.ones(len(batch["x"]), np.float32), **batch}
    num_local = len(mesh.local_devices)
    batch = pad_batch(batch, num_local)
    if stacked:
        sharding = NamedSharding(local_mesh(mesh), P(AXIS))
        return {
            k: jax.device_put(np.asarray(v).reshape(num_local, -1, *v.shape[1:]), sharding)
            for k, v in batch.items()
        }
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (v.shape[0] * jax.process_count(), *v.shape[1:])
        )
        for k, v in batch.items()
    }


def _on_every_device(tree, mesh: Mesh, *, stacked: bool):
    """One copy of each leaf on every device: global replicated `P()` arrays, or,
    for pmap, this process's stacked `[local devices, ...]` arrays."""
    mesh = local_mesh(mesh) if stacked else mesh
    spec = P(AXIS) if stacked else P()

    def place(a):
        a = a[None] if stacked else a
        shape = (mesh.size, *a.shape[1:]) if stacked else a.shape
        shards = [jax.device_put(a, d, may_alias=False) for d in mesh.local_devices]
        return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, spec), shards)

    return jax.tree.map(place, tree)


# ------------------------------------------------------------------ launchers


def shard_map_step(train_step: Callable, mesh: Mesh) -> Callable:
    """`jit(shard_map(train_step))`: state replicated, batch sharded on axis 0."""
    return jax.jit(_shard_map(train_step, mesh, (P(), P(AXIS))), donate_argnums=0)


def pmap_step(train_step: Callable, mesh: Mesh) -> Callable:
    """`pmap(train_step, axis_name="data")` over the mesh's devices: state `[D, ...]`."""
    return jax.pmap(train_step, axis_name=AXIS, devices=list(mesh.devices.flat), donate_argnums=0)


def _shard_map(f: Callable, mesh: Mesh, in_specs) -> Callable:
    # check_vma=False keeps pmap's semantics: the gradient of replicated params is
    # per replica until the step's own psum (with check_vma=True JAX would psum it
    # implicitly and the step's psum would count it again).
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """One per-replica step launched over a data mesh.

    Attributes:
      launcher: "shard_map" or "pmap".
      mesh: the `Mesh(devices, ("data",))`.
    """

    launcher: str
    mesh: Mesh

    @property
    def stacked(self) -> bool:
        return self.launcher == "pmap"

    @property
    def num_replicas(self) -> int:
        return self.mesh.size

    @property
    def platform(self) -> str:
        """The mesh's platform: "cpu", "gpu", "tpu"."""
        return self.mesh.devices.flat[0].platform

    def replicate(self, tree):
        """A copy on every device of a tree every replica reads whole, the state
        (replicated, or stacked for pmap)."""
        return _on_every_device(tree, self.mesh, stacked=self.stacked)

    def local(self, tree):
        """This process's first replica of a tree the step returned, on one device."""
        if self.stacked:
            return jax.tree.map(lambda a: a.addressable_shards[0].data[0], tree)
        return jax.tree.map(lambda a: a.addressable_shards[0].data, tree)

    def put_batch(self, batch: Mapping) -> dict:
        """A global batch (the same on every process) padded to a multiple of the
        device count, of which this process places only its own rows."""
        batch = pad_batch(batch, self.num_replicas)
        own = process_rows(self.mesh, batch["mask"].shape[0])
        return shard_batch({k: v[own] for k, v in batch.items()}, self.mesh, stacked=self.stacked)

    def step(self, train_step: Callable) -> Callable:
        """`step(state, placed_batch) -> (state, metrics)`, compiled once."""
        launch = pmap_step if self.stacked else shard_map_step
        return launch(train_step, self.mesh)

    def compile(self, fn: Callable, in_specs: tuple) -> Callable:
        """`fn` run per replica, its first argument (the state, donated) replicated
        and the others laid out by `in_specs`: pmapped over their leading axis, or
        jitted `shard_map` with these specs."""
        if self.stacked:
            return jax.pmap(
                fn, axis_name=AXIS, devices=list(self.mesh.devices.flat), donate_argnums=0
            )
        return jax.jit(_shard_map(fn, self.mesh, in_specs), donate_argnums=0)

    def full_batch(self, iterations: Callable) -> Callable:
        """`iterations(state, x, y, mask, num, tol, *, capacity)` (a per-replica
        `make_full_batch_iterations`) run per replica on its rows of the data (placed
        with `put_batch`), compiled once per `capacity`."""
        compiled = {}
        specs = (P(), P(AXIS), P(AXIS), P(AXIS), P(), P())

        def run(*args, capacity: int):
            if capacity not in compiled:
                fn = functools.partial(iterations, capacity=capacity)
                compiled[capacity] = self.compile(fn, specs)
            return compiled[capacity](*args)

        return run

    def put_epoch_batches(self, batches: tuple) -> tuple:
        """This process's columns of an epoch's batches, `[S, b, ...]` arrays with `b`
        a multiple of its device count, placed so that each device holds only its
        own `b / local devices` columns: global `[S, B, ...]` arrays sharded on axis
        1, or for pmap this process's `[local devices, S, b / local devices, ...]`."""
        num_local = len(self.mesh.local_devices)

        def place(a):
            a = np.asarray(a)
            steps, columns = a.shape[:2]
            if self.stacked:
                a = a.reshape(steps, num_local, columns // num_local, *a.shape[2:])
                sharding = NamedSharding(local_mesh(self.mesh), P(AXIS))
                return jax.device_put(np.moveaxis(a, 1, 0), sharding)
            sharding = NamedSharding(self.mesh, EPOCH_BATCHES)
            global_shape = (steps, columns * jax.process_count(), *a.shape[2:])
            return jax.make_array_from_process_local_data(sharding, a, global_shape)

        return tuple(place(a) for a in batches)

    def put_local_batch(self, batch: Mapping) -> dict:
        """This process's rows of a global batch (its columns, `fml.batching`), placed
        on its devices as part of the global array."""
        return shard_batch(batch, self.mesh, stacked=self.stacked)

    def programs(self, train_step: Callable, *, fused: bool) -> tuple:
        """The compiled per-replica programs a runner takes: `(step,)` host-fed (its
        dispatch bounded for pmap on XLA:CPU), `(scan,)` fused: the epoch's
        batches scanned per replica over its columns of each (`make_batch_scan`)."""
        if fused:
            specs = (P(), EPOCH_BATCHES, EPOCH_BATCHES, EPOCH_BATCHES)
            return (self.compile(make_batch_scan(train_step), specs),)
        step = self.step(train_step)
        if self.stacked and self.mesh.devices.flat[0].platform == "cpu":
            step = bounded_dispatch(step)  # else XLA:CPU may abort (see PMAP_IN_FLIGHT)
        return (step,)

    def host_runner(self, programs: tuple, stream) -> HostRunner:
        """Per-replica steps (`programs(..., fused=False)`) fed by `stream`: each process
        reads its columns of every global batch and places them on its devices."""
        (step,) = programs
        return HostRunner(
            step, stream, stream.steps_per_epoch, put=self.put_local_batch, local=self.local
        )

    def array_stream(self, x, y, *, batch_size, seed, drop_remainder, shuffle) -> BatchStream:
        """The stream of in-memory `(x, y)` (the same arrays on every process), each
        process reading its own columns of the global batches."""
        return BatchStream(
            ArraySource(x, y),
            batch_size=batch_size,
            seed=seed,
            drop_remainder=drop_remainder,
            shuffle=shuffle,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def fused_runner(
        self, programs: tuple, x, y, *, seed, batch_size, drop_remainder, shuffle
    ) -> GatheredRunner:
        """Fused epochs (`programs(..., fused=True)`) over `(x, y)` (the same arrays on
        every process, kept on the host): each epoch's global batches are those of
        `fml.batching`; each process gathers its columns of them and each device
        receives only its own (`put_epoch_batches`)."""
        (run_batches,) = programs
        return GatheredRunner(
            run_batches,
            np.asarray(x),
            np.asarray(y),
            num_examples=x.shape[0],
            batch_size=batching.batch_rows(x.shape[0], batch_size),
            drop_remainder=drop_remainder,
            shuffle=shuffle,
            seed=seed,
            put=self.put_epoch_batches,
            local=self.local,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            columns_multiple=len(self.mesh.local_devices),
        )


def data_parallel(launcher: str = "shard_map", devices=None) -> DataParallel:
    """A `DataParallel` over `devices` (default: every device of every process)."""
    if launcher not in LAUNCHERS:
        raise unknown("parallel launcher", launcher, LAUNCHERS)
    return DataParallel(launcher, data_mesh(devices))


# ------------------------------------------------------------------ many processes


class Cluster(NamedTuple):
    """Where this process stands in a multi-process run."""

    coordinator_address: str | None
    num_processes: int
    process_id: int
    source: str  # "arguments", "JAX_* variables", "SLURM", "TPU pod", "single process"


# JAX's own conventions, so fml and `jax.distributed.initialize()` agree.
SLURM_PORT_BASE = 65535 - 2**12 + 1  # port = job id % 4096 + this
TPU_COORDINATOR_PORT = 8482


def _first_slurm_host(node_list: str) -> str:
    """The first host of a SLURM node list: 'node[001-004,9],gpu7' -> 'node001'."""
    prefix, bracket, rest = node_list.partition("[")
    if "," in prefix or not bracket:
        return prefix.split(",", 1)[0]
    return prefix + rest.split("]", 1)[0].split(",", 1)[0].split("-", 1)[0]


def _from_environment(env: Mapping) -> tuple[str, dict]:
    """The launcher whose variables are set, and the values they give."""
    port = env.get("JAX_COORDINATOR_PORT")
    if "JAX_COORDINATOR_ADDRESS" in env or "JAX_NUM_PROCESSES" in env:
        # Kubeflow Trainer's JAX runtime on Kubernetes, or any launcher that sets these.
        return "JAX_* variables", {
            "coordinator_address": env.get("JAX_COORDINATOR_ADDRESS"),
            "num_processes": env.get("JAX_NUM_PROCESSES"),
            "process_id": env.get("JAX_PROCESS_ID"),
        }
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        port = port or int(env["SLURM_JOB_ID"]) % 2**12 + SLURM_PORT_BASE
        return "SLURM", {
            "coordinator_address": f"{_first_slurm_host(nodes)}:{port}" if nodes else None,
            "num_processes": env["SLURM_NTASKS"],
            "process_id": env["SLURM_PROCID"],
        }
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts and "TPU_WORKER_ID" in env:
        hosts = hosts.split(",")
        host = hosts[0].rsplit(":", 1)[0] if hosts[0].count(":") == 1 else hosts[0]
        return "TPU pod", {
            "coordinator_address": f"{host}:{port or TPU_COORDINATOR_PORT}",
            "num_processes": len(hosts),
            "process_id": env["TPU_WORKER_ID"],
        }
    return "single process", {}


def _as_int(value, name: str, source: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected {name} as an int (from {source}), got {value!r}") from None


def cluster_from_environment(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping | None = None,
) -> Cluster:
    """Resolves the coordinator address, process count and process id.

    Arguments win; what they leave out comes from the environment, read in this
    order: `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`
    (set by Kubeflow Trainer on Kubernetes, or by hand), SLURM (`SLURM_NTASKS`,
    `SLURM_PROCID`, the first host of `SLURM_STEP_NODELIST`, port
    `SLURM_JOB_ID % 4096 + 61440` as JAX picks it), TPU pods on GKE
    (`TPU_WORKER_HOSTNAMES`, `TPU_WORKER_ID`, port 8482). `JAX_COORDINATOR_PORT`
    overrides the derived ports. With none of these, the run is one process.

    Raises:
      ConfigError: when a value is missing or out of range.
    """
    env = os.environ if env is None else env
    source, found = _from_environment(env)
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if any(v is not None for v in given.values()):
        source = "arguments" if source == "single process" else f"arguments and {source}"
    values = {k: given[k] if given[k] is not None else found.get(k) for k in given}
    if source == "single process":
        return Cluster(None, 1, 0, source)
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ConfigError(f"multi-process run from {source} is missing {', '.join(missing)}")
    n = _as_int(values["num_processes"], "num_processes", source)
    pid = _as_int(values["process_id"], "process_id", source)
    if not 0 <= pid < n:
        raise ConfigError(f"expected 0 <= process_id < num_processes={n}, got {pid} ({source})")
    address = str(values["coordinator_address"])
    if n > 1 and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"expected coordinator_address as host:port, got {address!r}")
    return Cluster(address, n, pid, source)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until a TCP connection to `address` (host:port) opens.

    Raises:
      DistributedError: when it does not within `timeout_s` seconds.
    """
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection(
                (host, int(port)), timeout=max(0.05, min(1.0, remaining))
            ):
                return
        except OSError as e:
            if time.monotonic() + 0.2 >= deadline:
                raise DistributedError(
                    f"could not reach the coordinator at {address} within {timeout_s:g} s "
                    f"({e.strerror or e}); check the address and port, that process 0 is "
                    "running, and that no firewall is in the way"
                ) from None
            time.sleep(0.2)


def _warn_after(timeout_s: float, message: str) -> threading.Timer:
    """Prints `message` to stderr if not cancelled within `timeout_s` (JAX aborts the
    process a few seconds later, from C++, with a cryptic DEADLINE_EXCEEDED)."""
    timer = threading.Timer(timeout_s, lambda: print(message, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    return timer


def _positive_seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"expected {name} > 0 seconds, got {value!r}")
    return float(value)


def _device_ids(ids) -> list[int] | None:
    """`ids` as a list of distinct non-negative ints (None stays None), else `ConfigError`."""
    if ids is None:
        return None
    given = ids
    ids = list(ids) if isinstance(ids, Sequence | np.ndarray) and not isinstance(ids, str) else []
    if (
        not ids
        or any(isinstance(i, bool) or not isinstance(i, int | np.integer) or i < 0 for i in ids)
        or len(set(ids)) != len(ids)
    ):
        raise ConfigError(
            "expected local_device_ids as distinct non-negative ints (e.g. range(4)), "
            f"got {given!r}"
        )
    return [int(i) for i in ids]


def _kv_client():
    """JAX's distributed key-value store client (`jax.experimental.multihost_utils`
    reaches it the same way; JAX has no public accessor)."""
    return jax_distributed.global_state.client


def check_agreement(cluster: Cluster, *, timeout_s: float) -> None:
    """Every process must have been told the same process count and bring the
    same number of devices: each publishes `(num_processes, local devices)` in
    JAX's key-value store and reads every other's, within `timeout_s`.

    Raises:
      DistributedError: a process disagrees (the message names it and its
        values), or one did not publish in time.
    """
    client = _kv_client()
    mine = {"num_processes": cluster.num_processes, "devices": jax.local_device_count()}
    client.key_value_set(f"fml/initialize/{cluster.process_id}", json.dumps(mine))
    where = f"process {cluster.process_id} of {cluster.num_processes}"
    for other in range(cluster.num_processes):
        if other == cluster.process_id:
            continue
        try:
            theirs = json.loads(
                client.blocking_key_value_get(
                    f"fml/initialize/{other}", max(1, int(timeout_s * 1000))
                )
            )
        except Exception as e:  # JAX raises its runtime's error type on a timeout
            raise DistributedError(
                f"{where}: process {other} did not report its settings within {timeout_s:g} s "
                f"({type(e).__name__}); it was started with fewer processes, or died"
            ) from None
        if theirs != mine:
            raise DistributedError(
                f"{where}: processes disagree on the run's shape: this one has {mine}, "
                f"process {other} has {theirs}; start every process with the same "
                "num_processes and the same number of devices"
            )
    if jax.process_count() != cluster.num_processes:
        raise DistributedError(
            f"{where}: JAX joined {jax.process_count()} processes, not {cluster.num_processes}"
        )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = 60.0,
    heartbeat_timeout_s: float = 100.0,
    shutdown_timeout_s: float = 300.0,
    local_device_ids: Sequence[int] | None = None,
) -> Cluster:
    """Joins this process to a multi-process run with `jax.distributed.initialize`.

    Call it first, before any JAX computation, in every process. Values left out
    come from the environment (`cluster_from_environment`); with no settings at
    all it does nothing and returns a one-process `Cluster`. On CPU it selects
    gloo collectives. Afterwards every process has checked that all agree on the
    process count and bring the same number of devices (`check_agreement`),
    `jax.devices()` lists every process's devices, and
    `fit(..., parallel="shard_map")` (the default when there are several
    processes) trains over all of them.

    What a dead peer does to the others is JAX's: its coordination service
    notices missed heartbeats after `heartbeat_timeout_s` and ends every other
    process. JAX ends them from C++ (the process exits with a non-zero status
    and a "heartbeat" / "unavailable" message on stderr), not with a Python
    exception, so fml cannot turn that into a `DistributedError`; it bounds the
    time instead. A peer that dies inside a collective may end the others
    sooner, with gloo's connection error.

    Args:
      coordinator_address: "host:port" of process 0, which runs the coordinator.
      num_processes: how many processes join.
      process_id: this process's index, 0 to `num_processes - 1`.
      timeout_s: how long to wait for the coordinator and the other processes.
        A process that cannot reach the coordinator raises `DistributedError`
        within it; if the coordinator is reachable but not every process joins in
        time, a clear message is printed at `timeout_s` and JAX's runtime aborts
        the process a few seconds later (it offers no way to recover).
      heartbeat_timeout_s: how long a process may miss heartbeats before the
        coordinator declares it dead and the others are ended (JAX's
        `heartbeat_timeout_seconds`, whole seconds, at least 1).
      shutdown_timeout_s: how long `jax.distributed.shutdown` waits at the end
        of a run for every process to reach it (JAX's `shutdown_timeout_seconds`).
      local_device_ids: the local devices (GPU ordinals) this process drives,
        e.g. `range(4)` for a SLURM task that holds 4 GPUs. None: JAX's default,
        which under SLURM is one GPU per task, number `SLURM_LOCALID` (right for
        one task per GPU; a task with several would drive only one of them),
        unless `JAX_LOCAL_DEVICE_IDS` ("0,1,2,3") is set. A one-process run
        ignores it (it uses every visible device; set `CUDA_VISIBLE_DEVICES`).

    Returns:
      the `Cluster` joined.

    Raises:
      ConfigError: settings missing or inconsistent.
      DistributedError: coordinator unreachable in time, JAX already started, or
        processes that disagree on the process count or their number of devices.

    Example:
      >>> import fml
      >>> fml.parallel.initialize()     # SLURM, Kubeflow, TPU pod, or one process
      Cluster(coordinator_address=None, num_processes=1, process_id=0, source='single process')
    """
    timeout_s = _positive_seconds(timeout_s, "timeout_s")
    heartbeat_timeout_s = _positive_seconds(heartbeat_timeout_s, "heartbeat_timeout_s")
    shutdown_timeout_s = _positive_seconds(shutdown_timeout_s, "shutdown_timeout_s")
    local_device_ids = _device_ids(local_device_ids)
    cluster = cluster_from_environment(coordinator_address, num_processes, process_id)
    if cluster.num_processes == 1:
        return cluster
    if jax.distributed.is_initialized():
        raise DistributedError("JAX's distributed runtime is already initialized in this process")
    # gloo is the CPU client's cross-process collectives; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"process {cluster.process_id} of {cluster.num_processes}"
    if cluster.process_id != 0:
        try:
            wait_for_coordinator(cluster.coordinator_address, timeout_s)
        except DistributedError as e:
            raise DistributedError(f"{where}: {e}") from None
    warning = _warn_after(
        timeout_s,
        f"fml.parallel.initialize: {where} waited {timeout_s:g} s for all "
        f"{cluster.num_processes} processes to join the coordinator at "
        f"{cluster.coordinator_address}; one is missing or was started with other "
        "settings. JAX's distributed runtime will abort this process.",
    )
    try:
        jax.distributed.initialize(
            cluster.coordinator_address,
            cluster.num_processes,
            cluster.process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=max(1, math.ceil(timeout_s)),
            heartbeat_timeout_seconds=max(1, math.ceil(heartbeat_timeout_s)),
            shutdown_timeout_seconds=max(1, math.ceil(shutdown_timeout_s)),
        )
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"{where}: jax.distributed.initialize failed: {e}") from e
    finally:
        warning.cancel()
    try:
        check_devices_per_process(jax.devices())
        check_agreement(cluster, timeout_s=timeout_s)
    except DistributedError:
        jax.distributed.shutdown()
        raise
    return cluster


# ------------------------------------------------------------------ bounded in-flight work

# XLA:CPU runs each device's part of a pmapped program on a worker thread, and
# an all-reduce waits (40 s, then aborts the process) until all of its
# participants have arrived. With many host-fed pmap steps dispatched ahead,
# one device's part of an early step was never scheduled: 7 of 8 participants
# waited and XLA killed the process (mnist1d MLP 512-512, 8 CPU devices: stuck
# after 9 to 16 steps dispatched ahead). At most this many steps in flight ran
# every step to the end (189 steps).
PMAP_IN_FLIGHT = 4


def bounded_dispatch(step: Callable, *, every: int = PMAP_IN_FLIGHT) -> Callable:
    """`step(state, *args) -> outputs` that waits for its own outputs every `every`
    calls, so that no more than `every` launches are ever in flight.

    Wrap host-fed pmap steps on XLA:CPU with it (`jax.devices()[0].platform ==
    "cpu"`); on accelerators it only costs a pipeline drain every `every` steps.

    Args:
      step: the launched step (e.g. `pmap_step(...)`).
      every: how many calls may be in flight before the next waits.

    Example:
      >>> import jax
      >>> double = bounded_dispatch(jax.jit(lambda s: s * 2), every=2)
      >>> int(double(double(double(1))))
      8
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"expected every to be a positive int, got {every!r}")
    calls = 0

    def bounded(*args, **kwargs):
        nonlocal calls
        outputs = step(*args, **kwargs)
        calls += 1
        if calls % every == 0:
            jax.block_until_ready(outputs)
        return outputs

    return bounded
