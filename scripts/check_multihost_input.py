"""Two real JAX processes on this machine (2 CPU devices each, gloo collectives) read
one epoch through `fml.data.BatchStream`, each only its own rows, assembled into global
arrays over a 4-device mesh. Checks: every process sees the same global batches, these
are the batches of a one-process run, and the local rows are disjoint.

  python scripts/check_multihost_input.py        # prints OK or fails with the difference
"""

import json
import os
import subprocess
import sys

import numpy as np

N, BATCH, SEED, PROCESSES = 23, 8, 5, 2


def arrays():
    x = np.arange(N, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return x, np.arange(N, dtype=np.int32) % 4


def worker(process_id: int, port: int):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", PROCESSES, process_id)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from fml.data import ArraySource, BatchStream

    mesh = Mesh(np.array(jax.devices()), ("data",))
    stream = BatchStream(
        ArraySource(*arrays()),
        batch_size=BATCH,
        seed=SEED,
        epochs=1,
        sharding=NamedSharding(mesh, PartitionSpec("data")),
    )
    global_rows, local_rows = [], []
    for batch in stream:
        assert batch["x"].shape == (BATCH, 3)
        rows = multihost_utils.process_allgather(batch["x"][:, 0] * batch["mask"], tiled=True)
        global_rows.append(np.asarray(rows).tolist())
        local = [np.asarray(s.data)[:, 0] for s in batch["x"].addressable_shards]
        local_rows.append(np.concatenate(local).tolist())
    print(json.dumps({"global": global_rows, "local": local_rows}), flush=True)


def main():
    port = 12000 + os.getpid() % 1000
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(p), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(PROCESSES)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"worker failed with {p.returncode}"
        results.append(json.loads(out.strip().splitlines()[-1]))

    from fml.data import ArraySource, BatchStream

    x, y = arrays()
    single = BatchStream(ArraySource(x, y), batch_size=BATCH, seed=SEED, epochs=1, put=lambda b: b)
    expected = [(b["x"][:, 0] * b["mask"]).tolist() for b in single]
    for r in results:
        assert r["global"] == expected, (r["global"], expected)
    for step in range(len(expected)):
        a, b = (set(r["local"][step]) for r in results)
        assert len(results[0]["local"][step]) == BATCH // PROCESSES
        assert not (a & b - {0.0}), f"step {step}: processes share rows {a & b}"
    print(f"OK: {PROCESSES} processes, {len(expected)} global batches identical to one process's")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
