"""The ``lars-plugins`` command line: ``lars-plugins demo`` (and more subcommands as they land)."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, demo

    parser = argparse.ArgumentParser(prog="lars-plugins", description="LARS for PyTorch, timm, HF and Lightning.")
    parser.add_argument("--version", action="version", version=f"lars_plugins {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser(
        "demo", help="large-batch training on bundled real digits: LARS beside linearly scaled SGD",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
