"""The ``hist-st`` command line. Subcommands are thin: each module in this package registers its
commands and calls library functions that are importable from Python."""

from __future__ import annotations

import argparse
import importlib
import sys

from hist_st.errors import InputError

# Modules under hist_st.cli that each define ``register(subparsers)``.
COMMAND_MODULES: list[str] = ["data", "train", "demo", "bench", "experiments"]


def build_parser() -> argparse.ArgumentParser:
    from hist_st import __version__

    parser = argparse.ArgumentParser(prog="hist-st", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hist-st {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"hist_st.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # ``key=value`` overrides may stand anywhere among the options (argparse takes only their first run)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    if extra and takes_overrides and not any(e.startswith("-") for e in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = args.func(args)
    except InputError as exc:
        print(f"hist-st {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
