"""`fml export RUN_DIR --to torch|safetensors|savedmodel|onnx [--out PATH]
[--platforms cpu cuda tpu]`."""

import pathlib

from fml.errors import ConfigError

SAVED_MODEL_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def add_export(subparsers) -> None:
    """Registers the `export` subcommand."""
    from fml.export import TARGETS

    p = subparsers.add_parser(
        "export",
        help="export a run's model to PyTorch, safetensors, a TF SavedModel or ONNX, "
        "verified against fml on a probe batch",
    )
    p.add_argument("run_dir", help="a run directory (fml.rundir layout)")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), help="the export format")
    p.add_argument(
        "--out",
        default=None,
        help="where to write (default RUN_DIR/export/"
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
    from fml.export import TARGETS, export
    from fml.rundir import load_run

    options = {}
    if args.platforms is not None:
        if args.to != "savedmodel":
            raise ConfigError(f"--platforms is for --to savedmodel, got --to {args.to}")
        options["platforms"] = tuple(args.platforms)
    model, params, config = load_run(args.run_dir)
    out = args.out or pathlib.Path(args.run_dir) / "export" / TARGETS[args.to].filename
    result = export(
        model,
        params,
        out,
        to=args.to,
        input_shape=tuple(config["input_shape"]),
        tolerance=args.tolerance,
        **options,
    )
    print(
        f"exported {model.family} to {args.to} at {result.path}: max abs diff vs fml on a "
        f"probe batch {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
    )
