"""scikit-learn parity: fml's linear regression, logistic regression, SVM and MLP
next to scikit-learn's estimators, trained in the same run on the same arrays.

    python experiments/sklearn_parity.py [--out runs/parity] [--scale 1.0]
"""

import argparse

from fml import parity


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/parity")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies fml's epochs")
    args = parser.parse_args()
    _, path = parity.parity_table(args.out, scale=args.scale)
    print(f"\ntable written to {path}; run directories under {args.out}/")


if __name__ == "__main__":
    main()
