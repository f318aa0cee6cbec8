"""The ``vislens`` command: a thin layer of argument parsing over the public functions.

One module per group of subcommands; each has ``add_<name>(subparsers)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vislens.cli import ablate, analyze, demo, doctor, extract, store
from vislens.errors import VislensError

DESCRIPTION = """\
vislens: extract the internals of a vision LLM once, analyse them many times.

  vislens demo --out DIR             the whole path on the embedded tiny LLaVA (no downloads)
  vislens extract --model M --data D --out STORE
  vislens analyze cosine|logit-lens|norm-attention STORE... --out DIR
  vislens report STORE... --out DIR  every analysis on one HTML page
  vislens ablate --model M --data D --out STORE --mode truncate|mask
  vislens info STORE / vislens verify STORE
  vislens doctor                     this machine, the kernels' paths and their checks

Stores are Zarr v3 folders (or s3://, memory://, https:// URLs) readable with xarray.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``vislens`` argument parser."""
    from vislens import __version__

    parser = argparse.ArgumentParser(
        prog="vislens", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"vislens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        extract.add_extract,
        ablate.add_ablate,
        analyze.add_analyze,
        analyze.add_report,
        store.add_info,
        store.add_verify,
        demo.add_demo,
        demo.add_toy,
        doctor.add_doctor,
    ):
        add(sub)
    return parser


def quiet_libraries() -> None:
    """Keep the libraries' chatter out of a normal run (``-v`` shows it): transformers' warnings
    (e.g. its torchvision fallback notice on every model load) and load/save progress bars, and
    the INFO logs of Dask's scheduler and workers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from vislens.cluster import quiet_dask

    quiet_dask()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vislens`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except VislensError as exc:
        print(f"vislens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
