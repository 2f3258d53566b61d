"""Does a 5-seed ensemble of the MNIST-1D CNN beat the single-model mean?

Trains `fml.models.presets.mnist1d_cnn` with 5 seeds as one vmapped sweep (the
main job's settings: adam, learning rate 2e-3, batch 100, 15 epochs), then
averages the members' class probabilities on the 1000 test examples.

Usage: python experiments/ensemble_mnist1d.py [--seeds 5] [--epochs 15] [--out runs/ensemble_mnist1d]
"""

import argparse
import json
import pathlib
import time

import fml
from fml.models import presets


def train_and_evaluate(seeds: int, epochs: int, learning_rate: float, out: str) -> dict:
    """Trains the ensemble, writes the best member's run directory and `ensemble.json`."""
    data = fml.data.load("mnist1d")
    started = time.perf_counter()
    result = fml.sweep(
        presets.mnist1d_cnn(),
        data,
        seeds=seeds,
        learning_rate=learning_rate,
        epochs=epochs,
        batch_size=100,
        fused=True,
    )
    report = result.ensemble()
    report["seconds"] = time.perf_counter() - started
    report["compiles"] = result.compiles
    report["member_test_accuracy"] = [row["test_accuracy"] for row in result.table]
    path = pathlib.Path(out)
    result.save(path, config={"family": "cnn", "dataset": "mnist1d", "epochs": epochs})
    (path / "ensemble.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--out", default="runs/ensemble_mnist1d")
    args = parser.parse_args()
    report = train_and_evaluate(args.seeds, args.epochs, args.learning_rate, args.out)
    members = report["members_test"]
    print(f"members' test accuracy: {report['member_test_accuracy']}")
    print(
        f"single model: mean {members['mean']:.4f} (std {members['std']:.4f}, "
        f"min {members['min']:.4f}, max {members['max']:.4f})"
    )
    print(f"{report['size']}-seed ensemble: {report['test']['accuracy']:.4f}")
    print(f"trained in {report['seconds']:.0f} s as one sweep ({report['compiles']} compile)")


if __name__ == "__main__":
    main()
