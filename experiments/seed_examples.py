"""The seed examples in fml: linear regression on a line, the 2 -> 1 linear model by
SGD, MLP 784-128-10 with Adam, the MNIST CNN, the CIFAR-style CNN with momentum, a
soft-margin SVM. MNIST/CIFAR-10 come from tensorflow-datasets when available, else
the embedded digits set (the table says which).

    python experiments/seed_examples.py [--out runs/seed_examples] [--scale 1.0]
"""

import argparse

from fml import seed_examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/seed_examples")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every epoch budget")
    args = parser.parse_args()
    _, path = seed_examples.seed_table(args.out, scale=args.scale)
    print(f"\ntable written to {path}; run directories under {args.out}/")


if __name__ == "__main__":
    main()
