"""Benchmark: `fml.sklearn.FmlSearchCV` (the grid × folds as one vmapped program)
vs scikit-learn's `GridSearchCV` (one `fit` per candidate and fold) on one grid.

The same estimator, grid and folds: an `FmlClassifier` MLP (64-64-10) on
scikit-learn's digits, 4 learning rates x 3 l2 strengths x 2 seeds = 24 candidates,
5 stratified folds (120 fits), 20 epochs of batch 64. Each run is a fresh Python
process, so wall time includes every compilation, as a user pays it; the runs
alternate between the two searches. Reports the median and spread of the repeats,
the speed-up and whether both picked the same best parameters.

Usage: python scripts/bench_search.py [--repeats 3] [--epochs 20] [--out runs/bench_search]
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

GRID = {"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2], "l2": [0.0, 1e-4, 1e-3], "seed": [0, 1]}


def _search(method: str, epochs: int) -> dict:
    """Runs one search in this process; returns its wall time and choice."""
    started = time.perf_counter()
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from fml.sklearn import FmlClassifier, FmlSearchCV

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    estimator = FmlClassifier("mlp", hidden_layer_sizes=(64,), epochs=epochs, batch_size=64)
    search = {"fml": FmlSearchCV, "sklearn": GridSearchCV}[method]
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    imported = time.perf_counter()
    result = search(estimator, GRID, cv=cv, refit=False).fit(x, y)
    done = time.perf_counter()
    return {
        "method": method,
        "search_s": done - imported,
        "with_imports_s": done - started,
        "best_params": result.best_params_,
        "best_score": float(result.best_score_),
        "mean_test_score": np.asarray(result.cv_results_["mean_test_score"]).tolist(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default="runs/bench_search")
    p.add_argument("--one", choices=["fml", "sklearn"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_search(args.one, args.epochs)))
        return {}
    runs = {"fml": [], "sklearn": []}
    for _ in range(args.repeats):
        for method in runs:
            command = [sys.executable, __file__, "--one", method, "--epochs", str(args.epochs)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
    seconds = {m: [r["search_s"] for r in rs] for m, rs in runs.items()}
    median = {m: statistics.median(s) for m, s in seconds.items()}
    report = {
        "grid": GRID,
        "candidates": len(GRID["learning_rate"]) * len(GRID["l2"]) * len(GRID["seed"]),
        "folds": 5,
        "epochs": args.epochs,
        "seconds": seconds,
        "median_s": median,
        "speedup": median["sklearn"] / median["fml"],
        "same_best_params": all(
            a["best_params"] == b["best_params"] for a, b in zip(runs["fml"], runs["sklearn"])
        ),
        "best_params": runs["fml"][0]["best_params"],
        "max_mean_score_diff": max(
            abs(u - v)
            for a, b in zip(runs["fml"], runs["sklearn"])
            for u, v in zip(a["mean_test_score"], b["mean_test_score"])
        ),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_search.json").write_text(json.dumps(report, indent=2))
    print(
        f"{report['candidates']} candidates x 5 folds, {args.epochs} epochs: "
        f"FmlSearchCV {median['fml']:.1f} s (spread {min(seconds['fml']):.1f}-"
        f"{max(seconds['fml']):.1f}), GridSearchCV {median['sklearn']:.1f} s (spread "
        f"{min(seconds['sklearn']):.1f}-{max(seconds['sklearn']):.1f}): "
        f"{report['speedup']:.2f}x; same best params: {report['same_best_params']} "
        f"{report['best_params']}"
    )
    return report


if __name__ == "__main__":
    main()
