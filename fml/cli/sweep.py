"""`fml sweep FAMILY --dataset D --lr 1e-3,3e-3 --seeds 5`: one vmapped sweep, a run
directory for the best member, the table and a plot of metric against hyperparameter."""

from fml import data as data_lib
from fml import models, rundir
from fml.errors import ConfigError, unknown
from fml.models import presets
from fml.sweep import sweep

# The families `fml sweep` takes: the same names as `fml train` (an RNN is `rnn --cell C`).
CLI_FAMILIES = presets.FAMILIES


def cli_model(family: str, dataset, *, cell: str = "gru"):
    """The model `fml sweep FAMILY` trains on `dataset` (the MNIST-1D presets, sized to
    the data)."""
    classes = dataset.num_classes
    if family == "linear_regression":
        return models.linear_regression()
    if classes is None:
        raise ConfigError(f"{family} needs a classification data set, got {dataset.name}")
    if family == "logistic_regression":
        return models.logistic_regression(classes)
    if family == "svm":
        return models.svm(classes)
    if family == "mlp":
        return presets.mnist1d_mlp(classes)
    if family == "cnn":
        images = len(dataset.input_shape) == 3
        return presets.mnist_cnn(classes) if images else presets.mnist1d_cnn(classes)
    if family == "rnn":
        return models.rnn(cell, 64, num_classes=classes)
    raise unknown("family", family, CLI_FAMILIES)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from e


def add_sweep_command(subparsers):
    p = subparsers.add_parser(
        "sweep", help="train a grid of configurations as one vmapped program; keep the best"
    )
    p.add_argument("family", choices=CLI_FAMILIES, help="the model family")
    p.add_argument("--cell", choices=("gru", "lstm", "simple"), default="gru", help="rnn cell")
    p.add_argument("--dataset", default="mnist1d", help="embedded data set (default mnist1d)")
    p.add_argument("--lr", default="1e-3", help="learning rates, comma-separated")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--C", dest="C", default=None, help="SVM C values, comma-separated")
    p.add_argument("--l2", default=None, help="L2 coefficients, comma-separated")
    p.add_argument("--weight-decay", default=None, help="adamw weight decays, comma-separated")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--validation", type=float, default=0.1, help="held-out fraction (selection)")
    p.add_argument("--fused", action="store_true", help="one XLA program per epoch")
    p.add_argument(
        "--out", default=None, help="run directory (default runs/sweep-FAMILY[-CELL]-DATASET)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a run already in --out (all of it)"
    )
    p.set_defaults(run=run_sweep_command)


def run_sweep_command(args):
    cell = f"-{args.cell}" if args.family == "rnn" else ""
    out = args.out or f"runs/sweep-{args.family}{cell}-{args.dataset}"
    rundir.prepare(out, overwrite=args.overwrite)  # before any training; clears a replaced run
    dataset = data_lib.load(args.dataset, validation=args.validation)
    model = cli_model(args.family, dataset, cell=args.cell)
    swept = {
        name: _floats(text)
        for name, text in (("C", args.C), ("l2", args.l2), ("weight_decay", args.weight_decay))
        if text is not None
    }
    result = sweep(
        model,
        dataset,
        seeds=args.seeds,
        learning_rate=_floats(args.lr),
        optimizer=args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        fused=args.fused,
        **swept,
    )
    config = {
        "family": args.family,
        "cell": args.cell if args.family == "rnn" else None,
        "dataset": args.dataset,
        "optimizer": args.optimizer,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "validation": args.validation,
    }
    out = result.save(out, config=config, preprocessing=dataset.preprocessing)
    print(result.markdown())
    print(
        f"\nbest: #{result.best} {result.best_config} (on {result.selected_on}); compiles: "
        f"{result.compiles}"
    )
    if dataset.task == "classification":
        report = result.ensemble()
        if "test" in report:
            print(
                f"ensemble of {report['size']}: test {result.metric} {report['test'][result.metric]:.4f}"
                f" vs members mean {report['members_test']['mean']:.4f}"
                f" (min {report['members_test']['min']:.4f}, max {report['members_test']['max']:.4f})"
            )
    print(f"run directory: {out}")
