"""``vislens doctor``: the machine, the kernels' paths, and their reference checks."""

from __future__ import annotations

import argparse
import json


def add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="this machine as vislens sees it, and the kernels checked against their references",
        description="Print the CPU and its features, the int8 GEMM the exact CPU lens screens with (and why "
        "others were passed over), torch's and numba's threads, Triton and CUDA; then run every kernel on small "
        "inputs against its reference (a few seconds). The first line is the one to paste into a bug report. "
        "Exits 1 if a check fails.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from vislens.doctor import diagnose

    report = diagnose()
    if args.json:
        print(json.dumps(report.as_dict(), indent=1, default=str))
        return 0 if report.ok else 1
    print(report.summary)
    for key, value in report.system.items():
        print(f"  {key}: {value}")
    for check in report.checks:
        mark = "ok  " if check.passed else "FAIL"
        print(f"  [{mark}] {check.name} ({check.seconds:.1f} s){'' if check.passed else ': ' + check.detail}")
    return 0 if report.ok else 1
