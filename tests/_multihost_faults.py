"""One process of a multi-process fault test:

  python tests/_multihost_faults.py PORT NUM_PROCESSES PROCESS_ID MODE

joins the run on 127.0.0.1:PORT (2 CPU devices, 10 s to join, 5 s heartbeat
timeout). MODE "die" ends process 1 right after joining (as a crash would) and
keeps process 0 training; "join" only joins. Exits 3 with the message on stderr
when joining fails with an `FmlError`.
"""

import os
import sys


def main(port, num_processes, process_id, mode):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np

    import fml

    try:
        fml.parallel.initialize(
            f"127.0.0.1:{port}", int(num_processes), int(process_id),
            timeout_s=10, heartbeat_timeout_s=5,
        )  # fmt: skip
    except fml.FmlError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 3
    print(f"process {process_id} joined", file=sys.stderr, flush=True)
    if mode == "die" and process_id == "1":
        os._exit(0)  # no shutdown: as if killed
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    for _ in range(200 if mode == "die" else 1):  # the peer's death ends this loop
        fml.fit(fml.models.mlp([8, 2]), (x, y), epochs=1, batch_size=16, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
