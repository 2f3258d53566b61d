"""The seed examples in fml: linear regression on a line, the 2 -> 1 linear model by
SGD, MLP 784-128-10 with Adam, the MNIST CNN, the CIFAR-style CNN with momentum, a
soft-margin SVM. MNIST/CIFAR-10 come from tensorflow-datasets when available, else
the embedded digits set (the table says which).

    python experiments/seed_examples.py [--out runs/seed_examples] [--scale 1.0]
"""

from fml import experiment, seed_examples

if __name__ == "__main__":
    experiment.script_main(__doc__, "runs/seed_examples", seed_examples.seed_table)
