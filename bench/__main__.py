"""Run the benchmarks and print one table of target vs measured (``make bench``).

Each ``bench/bench_*.py`` module has ``run() -> list[dict]`` with rows
``{"name", "target", "measured", "unit"}``. Pass module names to run a subset
(``make bench BENCH_ARGS="pipeline read"``). The table is also written to
``bench/results/latest.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _modules(selected: list[str]) -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if selected:
        names = [n for n in names if n.removeprefix("bench_") in selected or n in selected]
    return names


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def _meets(row: dict[str, Any]) -> bool | None:
    """Whether a row meets its numeric target (``better``: "lower" (default) or "higher")."""
    target, measured = row.get("target"), row.get("measured")
    if not isinstance(target, int | float) or not isinstance(measured, int | float):
        return None
    return measured >= target if row.get("better") == "higher" else measured <= target


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | target | measured | unit | ok |", "|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("ok", _meets(r))
        mark = "" if ok is None else ("yes" if ok else "NO")
        lines.append(
            f"| {r['name']} | {_fmt(r.get('target', ''))} | {_fmt(r['measured'])} "
            f"| {r.get('unit', '')} | {mark} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows: list[dict[str, Any]] = []
    for name in _modules(argv):
        start = time.perf_counter()
        print(f"# running {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"bench.{name}")
        rows.extend(module.run())
        print(f"# {name} took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    table = _table(rows)
    print(table)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
