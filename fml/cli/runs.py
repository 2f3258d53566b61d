"""`fml train`, `fml eval` and `fml predict`: the command-line face of
`fml.experiment` and `fml.predictor`."""

import argparse
import json
import pathlib

from fml import experiment
from fml import predictor as predictor_lib
from fml.cli import files
from fml.errors import ConfigError
from fml.models.presets import FAMILIES
from fml.step import SCHEDULES

# Command-line flag -> config key, for the settings `fml train` overrides.
OVERRIDES = {
    "family": "family",
    "dataset": "dataset",
    "cell": "cell",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "schedule": "schedule",
    "clip_norm": "clip_norm",
    "seed": "seed",
    "validation": "validation",
    "fallback": "fallback",
}


def add_train(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train one family on a data set; write a run directory",
        description="Trains FAMILY with its recipe for the data set and writes a run "
        "directory: config.json (re-run it with --config), spec.json, preprocessing.json, "
        "params.npz, history.json/.csv, curves.png and checkpoints/. Flags override the "
        "recipe, or the config file given with --config.",
    )
    p.add_argument("family", nargs="?", choices=FAMILIES, help="the model family")
    p.add_argument("--config", help="a run's config.json: train that run again (flags override)")
    p.add_argument("--dataset", help="e.g. mnist1d, digits, breast_cancer, iris, mnist")
    p.add_argument("--cell", choices=("gru", "lstm", "simple"), help="rnn cell (default gru)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", help="sgd, momentum, adam, adamw, lbfgs, ...")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (with adamw)")
    p.add_argument(
        "--schedule", choices=SCHEDULES, help="learning-rate schedule (cosine: decays to 0)"
    )
    p.add_argument("--clip-norm", type=float, help="clip gradients to this global norm")
    p.add_argument("--seed", type=int)
    p.add_argument("--validation", type=float, help="held-out fraction of train (default 0.1)")
    p.add_argument(
        "--fallback",
        help="an embedded set to train on when --dataset is not available here (e.g. digits)",
    )
    p.add_argument("--out", help="run directory (default runs/NAME, NAME from the settings)")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--resume", action="store_true", help="continue the run in --out (killed, or more --epochs)"
    )
    what.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def train_config(args: argparse.Namespace) -> dict:
    """The config `fml train ARGS` trains: `--config`'s file (or the family's recipe),
    then every flag given."""
    base = {}
    if args.config:
        base = _read_config(args.config)
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    merged = {**base, **overrides}
    for key in ("family", "dataset"):
        if merged.get(key) is None:
            raise ConfigError(f"fml train needs a {key}: give it (see fml train -h) or --config")
    family, dataset = merged.pop("family"), merged.pop("dataset")
    return experiment.make_config(family, dataset, **merged)


def _read_config(path) -> dict:
    """The settings of a saved run's `config.json` (the data set it asked for)."""
    try:
        saved = json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"no config file at {path}") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON config: {e}") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    saved = {**saved, "dataset": saved.get("dataset_requested", saved.get("dataset"))}
    return {k: saved[k] for k in experiment.CONFIG_KEYS if k in saved}


def _run_train(args):
    config = train_config(args)
    print(
        f"training {config['family']} on {config['dataset']}, device "
        f"{experiment.device_description()}"
    )
    result = experiment.train_and_evaluate(
        config,
        args.out,
        checkpoint=True,
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    print(f"test: {json.dumps(result.test)}  ({result.seconds:.1f} s)")
    print(f"run directory: {result.run_dir} (learning curves: {result.run_dir / 'curves.png'})")


def add_eval(subparsers):
    p = subparsers.add_parser("eval", help="recompute a run's test metrics from its directory")
    p.add_argument("run_dir")
    p.add_argument("--dataset", help="evaluate on this data set's test split instead")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    print(json.dumps(experiment.evaluate_run(args.run_dir, dataset=args.dataset)))


def add_predict(subparsers):
    p = subparsers.add_parser(
        "predict",
        help="predict raw inputs (.npy or .csv) with a run's model and preprocessing",
        description="Reads raw inputs (as the data set's source gives them: the run's "
        "preprocessing.json is applied), one example per row of a .csv (a header row is "
        "skipped) or along the first axis of a .npy, and writes one prediction per row.",
    )
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--input", required=True, help="x.npy or x.csv")
    p.add_argument("--proba", action="store_true", help="class probabilities, not labels")
    p.add_argument("--out", help="a .csv to write (default: print to stdout)")
    p.add_argument("--batch-size", type=int, default=1024, help="examples per compiled call")
    p.set_defaults(run=_run_predict)


def _run_predict(args):
    predictor = predictor_lib.load(args.run_dir, batch_size=args.batch_size)
    x = files.read_inputs(args.input, predictor.input_shape)
    if args.proba:
        header, rows = files.probability_rows(predictor.predict_proba(x), predictor.classes)
    else:
        header, rows = files.prediction_rows(predictor.predict(x), predictor.classes)
    text = files.csv_text(header, rows)
    if args.out:
        files.write_text(args.out, text)
        print(f"{len(rows)} predictions written to {args.out}")
    else:
        print(text, end="")


COMMANDS = [add_train, add_eval, add_predict]
