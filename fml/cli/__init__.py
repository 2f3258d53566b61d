"""The `fml` command line: train, evaluate, sweep and export models.

`fml` alone prints this help. Each subcommand is one module of this package;
`COMMANDS` lists the functions that register them.
"""

import argparse
import sys

from fml import __version__, runtime
from fml.cli import export, runs, sweep
from fml.errors import FmlError

# Each entry adds one subcommand's parser; its `run(args)` does the work.
COMMANDS = [*runs.COMMANDS, sweep.add_sweep_command, export.add_export]

DESCRIPTION = "fml: train, evaluate, sweep and export JAX-compiled models."


def build_parser() -> argparse.ArgumentParser:
    """The `fml` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="fml", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fml {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    """Runs `fml ARGV`; returns the exit status (2 on an `FmlError`, printed without a
    traceback). With no arguments, prints the help and returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    runtime.apply_process_settings()  # an entry point's choice for XLA:CPU; see fml.runtime
    try:
        args.run(args)
    except FmlError as e:
        print(f"fml: error: {e}", file=sys.stderr)
        return 2
    return 0
