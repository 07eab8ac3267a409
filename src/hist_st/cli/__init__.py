"""The ``hist-st`` command line. Subcommands are thin: each module in this package declares its commands
with `command` and calls library functions that are importable from Python."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hist_st import __version__
from hist_st.errors import InputError
from hist_st.memory import huge_pages_by_default

#: Modules under hist_st.cli whose `command`s make up ``hist-st``, in the order of its help.
COMMAND_MODULES: list[str] = ["train", "experiments", "bench"]
#: Command groups: name -> (help, metavar of their subcommands).
GROUPS = {"bench": ("benchmarks: accuracy (Table 2), efficiency (Table 1, Figure 3), speed, ...", "COMMAND"),
          "plot": ("figures (plot genes: H&E, measured and predicted expression)", "FIGURE")}
#: ``"bench speed"`` -> (function, options, `add_parser` keywords), filled by `command`.
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], Any], tuple, dict[str, Any]]] = {}
Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **kw: Any) -> Arg:
    """One ``add_argument(*flags, **kw)`` call, as data."""
    return flags, kw


def command(name: str, *options: Arg | list[Arg], **kw: Any) -> Callable:
    """Declare ``func(args)`` as ``hist-st NAME`` (``"bench speed"``: a subcommand of a `GROUPS` group) with
    the ``options`` (`arg` tuples; a list of them is a required mutually exclusive group) and `add_parser`
    keywords ``kw`` (help, usage, ...; the description defaults to the help)."""
    def register(func: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
        COMMANDS[name] = (func, options, kw)
        return func
    return register


def names(value: str) -> list[str]:
    """``"hist, ridge"`` -> ``["hist", "ridge"]`` (an argparse ``type``)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def ints(value: str) -> tuple[int, ...]:
    """``"500,2000"`` -> ``(500, 2000)`` (an argparse ``type``)."""
    return tuple(int(v) for v in names(value))


def show(text: str, where: Any) -> None:
    """Print a command's result ``text`` and where its results are."""
    print(f"{text}\nresults in {where}")


GENE_SET = "gene set: hvg:N (top N HVGs) or he:N (N most expressed)"
NO_PROGRESS = arg("--no-progress", action="store_true", help="hide progress bars")
OUT = arg("--out", required=True, type=Path, help="output folder")
#: HiST's configuration: YAML file, trailing ``key=value`` overrides.
CONFIG = [arg("--config", type=Path, help="HiST TrainConfig YAML"), NO_PROGRESS,
          arg("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. epochs=20 model.dim=256")]


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(f"hist_st.cli.{module}")
    parser = argparse.ArgumentParser(prog="hist-st", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hist-st {__version__}")
    subs = {"": parser.add_subparsers(dest="command", required=True, metavar="COMMAND")}
    for name, (func, options, kw) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group not in subs:
            text, metavar = GROUPS[group]
            g = subs[""].add_parser(group, help=text, description=text)
            subs[group] = g.add_subparsers(dest=f"{group}_command", required=True, metavar=metavar)
        p = subs[group].add_parser(leaf, **{"description": kw.get("help"), **kw})
        for option in options:
            target = p.add_mutually_exclusive_group(required=True) if isinstance(option, list) else p
            for flags, okw in option if isinstance(option, list) else [option]:
                target.add_argument(*flags, **okw)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    huge_pages_by_default()  # before torch is imported: tensors of 2 MB+ on huge pages (hist_st.memory)
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
