"""Data-parallel throughput of one family on this machine's devices.

  python experiments/data_parallel.py --family mlp --per-device-batch 128
  python experiments/data_parallel.py --simulate-cpu-devices 8   # 8 CPU devices

Reports samples/s per device and weak-scaling efficiency (1, 2, 4, ... devices
at the same per-device batch), and the overhead of the parallel step against
one device doing the same total work. Simulated CPU devices share the host's
cores, so there the figures measure overhead, not speed-up.
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # as a script: the repo root


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--family",
        default="mlp",
        help="mlp, cnn, gru, lstm, logistic_regression, svm, linear_regression",
    )
    p.add_argument("--launcher", default="shard_map", choices=["shard_map", "pmap"])
    p.add_argument("--per-device-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported")
    p.add_argument("--simulate-cpu-devices", type=int, default=0, help="force N CPU devices")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if args.simulate_cpu_devices:
        os.environ["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={args.simulate_cpu_devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from experiments import scaling

    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= jax.device_count()]
    report = scaling.data_parallel_report(
        args.family,
        device_counts=counts,
        per_device_batch=args.per_device_batch,
        launcher=args.launcher,
        steps=args.steps,
        repeats=args.repeats,
    )
    print(scaling.markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
