"""The environment block every benchmark writes beside its numbers: where, with what, from which commit."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def git(*cmd: str) -> str | None:
    """Output of a read-only git command in the repository, or None (no git, no commit yet)."""
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def provenance() -> dict:
    """Commit (and whether the tree differs from it), command line and UTC date."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": shlex.join(["python", *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def cpu_description() -> dict:
    return {"kind": "cpu", "processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()}


def write_results(out: Path, question: str, settings: dict, rows: list[dict], table_lines: list[str]) -> None:
    """A benchmark's results: <out> (JSON: the question, its settings, the environment, the rows) and <out>.md (the
    printed table), each written atomically."""
    import torch

    from bigbird_ja.common.atomic_io import atomic_write_text

    payload = {"question": question, **settings, "torch": torch.__version__,
               "environment": {**cpu_description(), **provenance()}, "rows": rows}
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), "\n".join(table_lines) + "\n")
