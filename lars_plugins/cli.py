"""The ``lars-plugins`` command line: ``demo`` (large-batch training on real images) and ``plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def build_parser(demo_options: bool = True) -> argparse.ArgumentParser:
    """The ``lars-plugins`` parser, with its ``demo`` and ``plot`` commands. ``demo_options=False``
    leaves out the demo's own options, which import torch: ``plot`` and ``--help`` do without."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="lars-plugins", description="LARS for PyTorch, timm, HF and Lightning.")
    parser.add_argument("--version", action="version", version=f"lars_plugins {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo_help = "large-batch training on real images (Fashion-MNIST, else bundled digits): LARS beside SGD"
    if demo_options:
        from .demo import job as demo

        demo_parser = sub.add_parser("demo", help=demo_help, description=demo.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        demo.add_arguments(demo_parser)
        demo_parser.set_defaults(run=demo.main)
    else:
        sub.add_parser("demo", help=demo_help)

    plot_parser = sub.add_parser(
        "plot", help="plot per-layer trust ratios from what a run logged",
        description="Plot per-layer metrics recorded by lars_plugins.TrustRatioMonitor, from its own history "
                    "files, Lightning's CSVLogger metrics.csv, the HF Trainer's trainer_state.json or "
                    "TensorBoard event files.",
    )
    plot_parser.add_argument("metrics", type=Path,
                             help="CSV with a 'step' column, .parquet, trainer_state.json (or a checkpoint "
                                  "folder), or TensorBoard events (a file or a run's folder)")
    plot_parser.add_argument("-o", "--output", type=Path, default=Path("trust_ratios.png"),
                             help="image to write (default trust_ratios.png; .svg and .pdf work too)")
    plot_parser.add_argument("--metric", default="trust_ratio",
                             help="metric to draw: trust_ratio (default), effective_lr, weight_norm, grad_norm")
    plot_parser.add_argument("--kind", default="report", choices=["report", "heatmap", "lines", "bars"],
                             help="report (all three, default), heatmap, lines or bars")
    plot_parser.add_argument("--title", default=None, help="figure title")
    plot_parser.set_defaults(run=_plot)
    return parser


def _plot(args: argparse.Namespace) -> None:
    from .plot import save_plot

    if not args.metrics.exists():
        raise SystemExit(f"lars-plugins plot: no such file: {args.metrics}")
    try:
        path = save_plot(args.metrics, args.output, kind=args.kind, metric=args.metric, title=args.title)
    except (ValueError, ImportError) as err:  # unknown metric, malformed file, a reader's package missing
        raise SystemExit(f"lars-plugins plot: {err}") from err
    except OSError as err:  # an output that cannot be written
        raise SystemExit(f"lars-plugins plot: cannot write {args.output}: {err.strerror or err}") from err
    print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``lars-plugins`` entry point; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Reading and plotting need no torch (650 MB before the first byte is read): the demo's options,
    # which import it, are built only when the demo is what was asked for.
    command = next((a for a in arguments if not a.startswith("-")), None)
    parser = build_parser(demo_options=command == "demo")
    args = parser.parse_args(arguments)
    if args.command is None:  # bare `lars-plugins`: what it can do
        parser.print_help()
        return 0
    args.run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
