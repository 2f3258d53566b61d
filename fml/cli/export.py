"""`fml export RUN_DIR --to torch,pt2,savedmodel,tflite,onnx,safetensors [--out PATH]
[--platforms cpu cuda tpu]`."""

import pathlib

from fml import rundir
from fml.errors import ConfigError, unknown
from fml.export import PROGRAMS, TARGETS, export

SAVED_MODEL_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def add_export(subparsers) -> None:
    """Registers the `export` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="export a run's model (with its preprocessing) to PyTorch, a torch.export "
        "program, a TF SavedModel, TFLite or ONNX, verified against fml on a probe batch",
        description="Writes RUN_DIR/export/FILE for each target and preprocessing.json "
        f"beside them. The programs ({', '.join(PROGRAMS)}) apply the run's preprocessing "
        "and take raw inputs; the state dicts (torch, safetensors) hold the model only.",
    )
    p.add_argument("run_dir", help="a run directory (from fml train or fml sweep)")
    p.add_argument(
        "--to",
        required=True,
        help=f"comma-separated targets: {', '.join(sorted(TARGETS))}",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write, with one target (default RUN_DIR/export/"
        + "|".join(t.filename for t in TARGETS.values())
        + ")",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max abs diff allowed against fml (default: 1e-4, ONNX 1e-3, times the output scale)",
    )
    p.add_argument(
        "--platforms",
        nargs="+",
        choices=SAVED_MODEL_PLATFORMS,
        default=None,
        help="savedmodel only: the platforms its program is serialised for (default: cpu cuda tpu)",
    )
    p.set_defaults(run=run_export)


def run_export(args) -> None:
    targets = [t.strip() for t in args.to.split(",") if t.strip()]
    for target in targets:
        if target not in TARGETS:
            raise unknown("export target", target, TARGETS)
    if args.out and len(targets) != 1:
        raise ConfigError(f"--out names one file; got {len(targets)} targets ({args.to})")
    platforms = getattr(args, "platforms", None)
    if platforms is not None and "savedmodel" not in targets:
        raise ConfigError(f"--platforms is for --to savedmodel, got --to {args.to}")
    model, params, config = rundir.load_run(args.run_dir)
    block = rundir.load_preprocessing(args.run_dir, config["input_shape"])
    for target in targets:
        out = args.out or pathlib.Path(args.run_dir) / "export" / TARGETS[target].filename
        result = export(
            model,
            params,
            out,
            to=target,
            input_shape=tuple(config["input_shape"]),
            tolerance=args.tolerance,
            preprocessing=block,
            **({"platforms": tuple(platforms)} if platforms and target == "savedmodel" else {}),
        )
        print(
            f"exported {model.family} to {target} at {result.path}: max abs diff vs fml on a "
            f"probe batch {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
        )
