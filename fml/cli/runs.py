"""`fml train` and `fml eval`: the command-line face of `fml.experiment`."""

import json

from fml.models.presets import FAMILIES


def add_train(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train one family on a data set; write a run directory",
        description="Trains FAMILY with its recipe for the data set (fml.models.presets) "
        "and writes config.json, spec.json, params.npz, history.json/.csv and curves.png.",
    )
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("--dataset", required=True, help="e.g. mnist1d, digits, breast_cancer, mnist")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", help="sgd, momentum, adam, adamw, ... (default: the recipe's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (with adamw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell", choices=("gru", "lstm", "simple"), help="rnn cell (default gru)")
    p.add_argument("--validation", type=float, help="held-out fraction of train (default 0.1)")
    p.add_argument("--out", help="run directory (default runs/FAMILY-DATASET-seedN)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in --out (a killed run, or more --epochs)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args):
    from fml import experiment

    config = experiment.make_config(
        args.family,
        args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        cell=args.cell,
        validation=args.validation,
    )
    out = args.out or f"runs/{args.family}-{args.dataset}-seed{args.seed}"
    print(f"training {args.family} on {args.dataset}, device {experiment.device_description()}")
    result = experiment.train_and_evaluate(
        config, out, checkpoint=True, resume=args.resume, quiet=args.quiet
    )
    print(f"test: {json.dumps(result.test)}  ({result.seconds:.1f} s)")
    print(f"run directory: {result.run_dir} (learning curves: {result.run_dir / 'curves.png'})")


def add_eval(subparsers):
    p = subparsers.add_parser("eval", help="recompute a run's test metrics from its directory")
    p.add_argument("run_dir")
    p.add_argument("--dataset", help="evaluate on this data set's test split instead")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    from fml import experiment

    print(json.dumps(experiment.evaluate_run(args.run_dir, dataset=args.dataset)))


COMMANDS = [add_train, add_eval]
