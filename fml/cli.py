"""The `fml` command line. `fml` alone runs the main job (the MNIST-1D table,
every family, seed 0); subcommands are registered in `COMMANDS`."""

import argparse
import sys

from fml import _cli_runs, runtime
from fml._sweep_cli import add_sweep_command
from fml.errors import FmlError
from fml.export.cli import add_export


def _add_main(subparsers):
    p = subparsers.add_parser("main", help="the MNIST-1D table: every family, seed 0; print it")
    p.add_argument("--out", default="runs/main", help="directory for the table (default runs/main)")
    p.add_argument("--quick", action="store_true", help="tiny budgets, for smoke tests")
    p.set_defaults(run=_run_main)


def _run_main(args):
    from fml import report

    report.main_job(out=args.out, quick=args.quick)


def _add_bench(subparsers):
    from fml import bench

    p = subparsers.add_parser("bench", help="benchmark fml against JAX, Flax, PyTorch, Keras")
    bench.add_arguments(p)
    p.set_defaults(run=bench.main)


# Each entry adds one subcommand's parser; its `run(args)` does the work.
COMMANDS = [_add_main, *_cli_runs.COMMANDS, add_sweep_command, add_export, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fml", description=__doc__)
    subparsers = parser.add_subparsers(dest="command")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    runtime.apply_process_settings()  # the entry point's process, not the library's
    parser = build_parser()
    args = parser.parse_args(argv or ["main"])
    try:
        args.run(args)
    except FmlError as e:
        print(f"fml: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
