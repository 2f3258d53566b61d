"""Benchmark fml against pure JAX, Flax, PyTorch, Keras and scikit-learn.

    python benchmarks/bench.py            # the full run (about 15 minutes on 2 cores)
    python benchmarks/bench.py --quick    # a smoke test
    python benchmarks/bench.py --models mlp --frameworks "fml fused epoch,PyTorch eager"

The work is done by `benchmarks.main`.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # as a script: the repo root
import benchmarks  # noqa: E402
from fml import runtime  # noqa: E402
from fml.errors import FmlError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmarks.add_arguments(parser)
    args = parser.parse_args(argv)
    runtime.apply_process_settings()  # the freed-memory setting, on the CPU backend
    try:
        benchmarks.main(args)
    except FmlError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
