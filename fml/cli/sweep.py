"""`fml sweep FAMILY --dataset D --lr 1e-3,3e-3 --seeds 5`: one vmapped sweep, a run
directory for the best member, the table and a plot of metric against hyperparameter."""

from fml.errors import ConfigError, unknown

# Family name -> the model the CLI sweeps (the MNIST-1D presets, sized to the data).
CLI_FAMILIES = ("linear_regression", "logistic_regression", "svm", "mlp", "cnn", "gru", "lstm")


def cli_model(family: str, dataset):
    """The model `fml sweep FAMILY` trains on `dataset`."""
    from fml import models
    from fml.models import presets

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
    if family in ("gru", "lstm"):
        return models.rnn(family, 64, num_classes=classes)
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
    p.add_argument("family", help=f"one of {', '.join(CLI_FAMILIES)}")
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
    p.add_argument("--out", default=None, help="run directory (default runs/sweep-FAMILY)")
    p.set_defaults(run=run_sweep_command)


def run_sweep_command(args):
    from fml import data as data_lib
    from fml.sweep import sweep

    dataset = data_lib.load(args.dataset, validation=args.validation)
    model = cli_model(args.family, dataset)
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
        "dataset": args.dataset,
        "optimizer": args.optimizer,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "validation": args.validation,
    }
    out = result.save(args.out or f"runs/sweep-{args.family}", config=config)
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
