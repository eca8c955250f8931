"""The 64x study in one table and one plot: every sweep under OUT (default experiments/results/study64; finished or
not) compared cell by cell, written to OUT/summary.md and OUT/summary.png. study64.sh runs it after its stages; it
also runs alone: python experiments/study64_summary.py [OUT]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from legw_fused.train.report import format_comparison, plot_comparison


def _order(path: Path) -> list:
    """Sweeps in name order with numbers compared as numbers (D-epochs-50 before D-epochs-100)."""
    parts = []
    for part in path.parents[1].name.split("-"):
        try:
            parts.append((0, float(part), ""))
        except ValueError:
            parts.append((1, 0.0, part))
    return parts


def main(out: Path) -> str:
    named = {p.parents[1].name: json.loads(p.read_text(encoding="utf-8"))
             for p in sorted(out.glob("*/*/results.json"), key=_order)}
    if not named:
        raise SystemExit(f"no sweep under {out} (expected {out}/<sweep>/<task>/results.json)")
    table = format_comparison(named)
    (out / "summary.md").write_text(
        "# The 64x study: every sweep, cell by cell\n\nMade by `python experiments/study64_summary.py` from each "
        "sweep's results.json (its command, commit, machine and versions are there).\n\n" + table, encoding="utf-8")
    plot_comparison(named, out / "summary.png")
    return table


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/study64")))
