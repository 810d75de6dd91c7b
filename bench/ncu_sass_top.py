"""The most stalled SASS instructions of an ncu source-page CSV (bench/ncu_w4a16.sh sass:SHAPE:M):
address, instruction, all warp-stall samples and the share of the kernel's, and the stall columns
with the most samples on that instruction.

    python3 bench/ncu_sass_top.py out/ncu-sass-8B_gate_up_1.csv 30
"""

from __future__ import annotations

import csv
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> int:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("==")]
    # ncu writes a "Kernel Name" line (or several kernels' blocks) before the column header: start at the header
    header = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), 0)
    rows = list(csv.DictReader(lines[header:]))
    rows = [r for r in rows if r.get("Address") not in (None, "Address")]
    if not rows:
        print(f"{path}: no rows (ncu's source page was empty or not written)", file=sys.stderr)
        return 1
    columns = list(rows[0])
    total_col = next((c for c in columns if c.startswith("Warp Stall Sampling (All")), None)
    source_col = next((c for c in columns if c.strip().lower() == "source"), None)
    address_col = next((c for c in columns if c.strip().lower() == "address"), None)
    if total_col is None or source_col is None:
        print(f"{path}: no stall-sampling or source column among {columns}", file=sys.stderr)
        return 1
    # per-reason sample columns over all samples ("stall_long_sb", ...), not their "(Not Issued)" twins
    reasons = [c for c in columns if c.startswith("stall_") and "(Not Issued)" not in c]
    total = sum(number(r[total_col]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} stall samples")
    for r in sorted(rows, key=lambda r: number(r[total_col]), reverse=True)[:top]:
        why = sorted(((number(r[c]), c) for c in reasons), reverse=True)[:2]
        why_text = ", ".join(f"{c} {v:.0f}" for v, c in why if v > 0)
        print(f"{r.get(address_col, ''):>8s} {number(r[total_col]) / total:6.1%}  {r[source_col].strip()[:70]:70s} {why_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
