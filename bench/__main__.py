"""Run the benchmarks and print one table of every target vs measured (``make bench``).

Each ``bench/bench_*.py`` module has ``run() -> list[dict]`` with rows ``{"name",
"target", "measured", "unit"}`` plus optional ``"better": "higher"`` (default: lower is
better) and ``"issue"`` (default: the module's issue, :data:`MODULE_ISSUES`). Pass
module names to run a subset (``make bench BENCH_ARGS="pipeline read"``). A full run
writes the table to ``bench/results/latest.md``, a subset to ``bench/results/subset.md``.
A module that fails gives one row saying so; the others still run.
"""

from __future__ import annotations

import datetime
import importlib
import math
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: Which issue's targets each module measures (rows may say otherwise with "issue").
MODULE_ISSUES = {
    "bench_read": 2, "bench_pipeline": 2, "bench_readers": 2,
    "bench_bridge": 3, "bench_tasks": 3, "bench_e2e": 3,
    "bench_identities": 4, "bench_identities_e2e": 4,
    "bench_prefetch": 5, "bench_load": 6, "bench_gateway": 13, "bench_soak": 15,
    "bench_formats": 18,
}  # fmt: skip
#: Run only when named (minutes long): ``python -m bench soak``.
NOT_IN_FULL_RUN = ("bench_soak",)
ISSUE_TITLES = {
    2: "image core (Eiger2 16M -> 1024 px)",
    3: "request path (REQ -> is-proxy -> bridge -> worker)",
    4: "per-identity workers",
    5: "prefetch",
    6: "load",
    13: "HTTP gateway, zoom tiles, worker memory",
    18: "other facilities' formats (fabio, NXmx VDS) at 16M",
}

Row = dict[str, Any]


def modules(selected: list[str]) -> list[str]:
    """``bench_*`` module names, all or those named (with or without the prefix)."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if selected:
        unknown = [s for s in selected if f"bench_{s.removeprefix('bench_')}" not in names]
        if unknown:
            raise SystemExit(f"no such benchmark: {', '.join(unknown)} (have: {', '.join(names)})")
        names = [n for n in names if n.removeprefix("bench_") in selected or n in selected]
    else:
        names = [n for n in names if n not in NOT_IN_FULL_RUN]
    return names


def run_module(name: str) -> list[Row]:
    """The module's rows tagged with their issue; one failure row if it raised."""
    issue = MODULE_ISSUES.get(name, 0)
    try:
        rows: list[Row] = importlib.import_module(f"bench.{name}").run()
    except Exception as exc:  # one broken benchmark must not lose the whole table
        traceback.print_exc()
        rows = [{"name": f"{name} FAILED: {type(exc).__name__}: {exc}"[:200],
                 "target": "", "measured": "error", "unit": "", "ok": False}]  # fmt: skip
    return [{"issue": issue, **row} for row in rows]


def fmt_number(value: Any) -> str:
    """Numbers with sensible precision; anything else as text."""
    if isinstance(value, float):
        if math.isnan(value):  # nothing was measured
            return "-"
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
        return f"{value:.{digits}f}"
    return str(value)


def fmt_target(row: Row) -> str:
    """``<= 60`` or ``>= 150``; empty when the row only informs."""
    target = row.get("target", "")
    if not is_number(target):
        return str(target)
    shown = int(target) if float(target).is_integer() else target
    return f"{'>=' if row.get('better') == 'higher' else '<='} {fmt_number(shown)}"


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def meets(row: Row) -> bool | None:
    """Whether a row meets its numeric target; None when it has none."""
    if row.get("ok") is not None:
        return bool(row["ok"])
    target, measured = row.get("target"), row.get("measured")
    if not isinstance(target, int | float) or not isinstance(measured, int | float):
        return None
    return bool(measured >= target if row.get("better") == "higher" else measured <= target)


def table(rows: list[Row]) -> str:
    """One Markdown table, grouped by issue (stable order within an issue)."""
    lines = ["| issue | benchmark | target | measured | unit | ok |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r["issue"]):
        ok = meets(row)
        mark = "" if ok is None else ("yes" if ok else "**NO**")
        lines.append(
            f"| {row['issue'] or ''} | {row['name']} | {fmt_target(row)} "
            f"| {fmt_number(row['measured'])} | {row.get('unit', '')} | {mark} |"
        )
    return "\n".join(lines)


def summary(rows: list[Row], *, full: bool) -> str:
    """Targets met per issue, and the names of those missed; in a full run also the
    issues no module measured."""
    lines = []
    issues = {r["issue"] for r in rows} | (set(ISSUE_TITLES) if full else set())
    for issue in sorted(issues):
        judged = [(r, meets(r)) for r in rows if r["issue"] == issue]
        with_target = [(r, ok) for r, ok in judged if ok is not None]
        missed = [r["name"] for r, ok in with_target if not ok]
        title = ISSUE_TITLES.get(issue, "other")
        if not judged:
            lines.append(f"- issue {issue} ({title}): not measured (no benchmark module)")
            continue
        met = len(with_target) - len(missed)
        line = f"- issue {issue or '?'} ({title}): {met}/{len(with_target)} targets met"
        lines.append(line + (f"; missed: {'; '.join(missed)}" if missed else ""))
    return "\n".join(lines)


def header(argv: list[str], started: datetime.datetime, wall_s: float) -> str:
    """When, how, and on what the table was measured (figures depend on the machine)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    command = " ".join(["python -m bench", *argv])
    return (
        f"# Benchmarks {started:%Y-%m-%d %H:%M}\n\n"
        f"`{command}`: {wall_s:.0f} s wall, {os.cpu_count()} CPUs, "
        f"load average at the end {load}.\n"
    )


def main(argv: list[str]) -> int:
    started_at = datetime.datetime.now()
    started = time.perf_counter()
    rows: list[Row] = []
    for name in modules(argv):
        module_started = time.perf_counter()
        print(f"# running {name} ...", file=sys.stderr, flush=True)
        rows.extend(run_module(name))
        print(f"# {name} took {time.perf_counter() - module_started:.1f} s", file=sys.stderr)
    report = "\n\n".join(
        [
            header(argv, started_at, time.perf_counter() - started),
            table(rows),
            summary(rows, full=not argv),
        ]
    )
    print(report)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / ("subset.md" if argv else "latest.md")).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
