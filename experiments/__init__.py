"""Experiments built on fml's public API: the MNIST-1D table, scikit-learn parity,
the seed examples and the data-parallel scaling study. Run the scripts from the
repository root, e.g. `python experiments/mnist1d_table.py --seeds 0`."""
