"""`vislens doctor`: the machine, the lens screen's path, and the kernels' reference checks."""

from __future__ import annotations

import json
import subprocess
import sys

from vislens.kernels.lens_topk.screen import PATHS, cpu_name


def test_doctor_names_the_cpu_the_lens_path_and_passes_its_checks():
    run = subprocess.run([sys.executable, "-m", "vislens", "doctor", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] and len(report["checks"]) == 5 and all(c["passed"] for c in report["checks"])
    assert report["summary"].startswith("vislens ") and cpu_name() in report["summary"]
    screen = report["system"]["lens_screen"]
    assert screen["path"] in PATHS and screen["probes"][screen["path"]] == "passed"
    assert f"lens screen {screen['path']} (probe passed)" in report["summary"]
    assert report["system"]["torch_threads"] >= 1 and report["system"]["numba_threads"] >= 1


def test_doctor_text_starts_with_the_line_for_a_bug_report():
    run = subprocess.run([sys.executable, "-m", "vislens", "doctor"], capture_output=True, text=True)
    first, *rest = run.stdout.splitlines()
    assert run.returncode == 0 and "all kernel checks passed" in first and cpu_name() in first
    assert sum(line.strip().startswith("[ok  ]") for line in rest) == 5
