"""Benchmark fml against pure JAX, Flax, PyTorch, Keras and scikit-learn.

    python scripts/bench.py            # the full run (about 15 minutes on 2 cores)
    python scripts/bench.py --quick    # a smoke test
    python scripts/bench.py --models mlp --frameworks "fml fused epoch,PyTorch eager"

Same as `fml bench`; the work is done by `fml.bench.main`.
"""

import argparse

from fml import bench, runtime

if __name__ == "__main__":
    runtime.apply_process_settings()  # XLA:CPU keeps freed memory (fml.runtime)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    bench.main(parser.parse_args())
