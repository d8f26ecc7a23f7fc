"""Driving ``../shared/compat`` (the replies recorded from the original C server): its data
generator and its replay tool, as its README says an operator runs them. Shared by the
replay against the local stack (tests/test_compat.py) and against the compose deployment
(tests/test_compose_stack.py); each test keeps its own checks of the outcome.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

COMPAT_DIR = Path(__file__).resolve().parents[2] / "shared" / "compat"


def write_golden_data(
    kit: Path, data: Path, owner_uid: int, owner_gid: int, timeout_s: float
) -> None:
    """The golden data, written by the kit's own generator and owned by the ESAF account
    (dir 0750, files 0640)."""
    subprocess.run(
        [sys.executable, str(kit / "make_testdata.py"), str(data), "--chown",
         f"{owner_uid}:{owner_gid}"],
        check=True, capture_output=True, timeout=timeout_s,
    )  # fmt: skip


def replay(
    kit: Path,
    *,
    endpoint: str,
    data: Path,
    redis: str,
    key: Path,
    user: str,
    esaf: int,
    report: Path,
    timeout_s: float,
) -> subprocess.CompletedProcess[str]:
    """``compare_golden.py --strict`` against ``endpoint``, its JSON report in ``report``."""
    return subprocess.run(
        [sys.executable, str(kit / "compare_golden.py"), "--strict",
         "--endpoint", endpoint, "--data-dir", str(data), "--redis", redis,
         "--key", str(key), "--user", user, "--esaf", str(esaf), "--json-out", str(report)],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


def replay_cases(report: Path) -> list[dict[str, Any]]:
    """The cases of a replay's JSON report ([] when the replay wrote none)."""
    if not report.exists():
        return []
    cases: list[dict[str, Any]] = json.loads(report.read_text())["cases"]
    return cases
