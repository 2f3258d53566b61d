"""The MNIST-1D table: logistic regression, MLP, CNN, GRU, LSTM and SVM, test
accuracy mean ± std over seeds and train seconds, next to the MNIST-1D paper; plus
the shuffled-sequence rows (CNN, GRU).

    python experiments/mnist1d_table.py [--out runs/mnist1d] [--seeds 0 1 2] [--scale 1.0] [--workers 2]
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # as a script: the repo root
from experiments import mnist1d_report  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mnist1d")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every epoch budget")
    parser.add_argument("--workers", type=int, default=1, help="training processes at once")
    parser.add_argument("--resume", action="store_true", help="keep finished runs in --out")
    parser.add_argument("--no-shuffled", action="store_true", help="skip the shuffled rows")
    args = parser.parse_args(argv)
    rows, path = mnist1d_report.mnist1d_table(
        args.out,
        seeds=args.seeds,
        scale=args.scale,
        shuffled=not args.no_shuffled,
        workers=args.workers,
        resume=args.resume,
    )
    print(f"\ntable written to {path}; learning curves in {args.out}/*/*/seed_*/curves.png")
    return rows


if __name__ == "__main__":
    main()
