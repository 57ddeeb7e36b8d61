"""Bar chart of the peer benchmark (runs in .venv-bench, which has matplotlib).

    python scripts/bench/chart.py RESULT.json OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"baseline": "#9e9e9e", "ours": "#1565c0", "peer": "#ef6c00"}


def main() -> int:
    res = json.loads(Path(sys.argv[1]).read_text())
    rows = [r for r in res["table"] if r.get("rows_per_second")]
    rows.sort(key=lambda r: r["rows_per_second"])
    names = [r["system"] for r in rows]
    colors = [COLORS.get(r["group"], "#555") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) + 2.2), sharey=True)
    for ax, key, title, log in ((axes[0], "rows_per_second", "pairs scored / s, end to end (log scale)", True),
                                (axes[1], "tokens_per_second", "real tokens encoded / s", False)):
        vals = [r[key] for r in rows]
        bars = ax.barh(names, vals, color=colors)
        if log:
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        for b, v, r in zip(bars, vals, rows):
            label = f"{v:,.0f}" if v >= 10 else f"{v:.2f}"
            if key == "rows_per_second" and r.get("ratio_to_baseline"):
                label += f"  ({r['ratio_to_baseline']:.0f}x baseline)"
            if key == "rows_per_second" and r.get("gate") and not r.get("reference"):
                label += "  gate " + ("pass" if r["gate"]["passed"] else "FAIL")
            ax.text(v, b.get_y() + b.get_height() / 2, " " + label, va="center", fontsize=8)
        ax.margins(x=0.35 if not log else 0.0)
        if log:
            lo, hi = min(vals), max(vals)
            ax.set_xlim(lo / 2, hi * 12)
    env = res["environment"]
    fig.suptitle(f"all-MiniLM-L6-v2 bi-encoder scoring, {res['settings']['threads']} thread(s), "
                 f"{env['cpu']['model']}; medians of {res['settings']['repeats']} runs "
                 f"({res['data']['pairs']} pairs; baseline: first {res['settings']['baseline_pairs']})",
                 fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, ["plain baseline", "our pipeline", "peer runtimes"], loc="lower center", ncol=3,
               fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
