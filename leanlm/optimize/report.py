"""The optimizer's outputs for people: the Pareto front as a PNG (matplotlib, the `bench` extra) and a
self-contained HTML report (the table, the plot inlined, the machine and the exact commands)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from leanlm.optimize.search import OBJECTIVES, SearchResult

LABELS = {
    "decode_tok_s": "decode tokens/s (batch 1)",
    "prefill_tok_s": "prefill tokens/s",
    "peak_rss_mib": "peak RSS (MiB)",
    "disk_bytes": "size on disk (bytes)",
}


def save_front_png(result: SearchResult, path: str | Path, references: list[dict] = ()) -> Path | None:
    """KL against the objective: every measured candidate, the front joined, the budget as a line, and reference
    points (llama.cpp's files) when given. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric, _ = OBJECTIVES[result.objective]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [e for e in result.entries if e.get(metric) is not None]
    for e in measured:
        colour = "tab:blue" if e.get("within_budget") else "tab:gray"
        ax.scatter(e["kl_mean"], e[metric], color=colour, zorder=3)
        ax.annotate(
            e["candidate"]["format"], (e["kl_mean"], e[metric]), fontsize=8, xytext=(4, 3), textcoords="offset points"
        )
    front = result.front
    ax.plot([e["kl_mean"] for e in front], [e[metric] for e in front], color="tab:blue", label="leanlm front")
    for ref in references:
        if ref.get(metric) is not None:
            ax.scatter(ref["kl_mean"], ref[metric], marker="x", color="tab:red", zorder=3)
            ax.annotate(
                ref["label"],
                (ref["kl_mean"], ref[metric]),
                fontsize=8,
                xytext=(4, -9),
                textcoords="offset points",
                color="tab:red",
            )
    if result.budget.max_kl is not None:
        ax.axvline(result.budget.max_kl, color="tab:green", linestyle="--", label=f"budget KL {result.budget.max_kl}")
    if result.best is not None:
        ax.scatter(
            result.best["kl_mean"],
            result.best[metric],
            s=160,
            facecolors="none",
            edgecolors="tab:green",
            zorder=4,
            label="chosen",
        )
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(original || candidate), nats/token (wiki text, search half)")
    ax.set_ylabel(LABELS[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def html_report(result: SearchResult, png: Path | None, machine: dict, commands: list[str], title: str) -> str:
    metric, _ = OBJECTIVES[result.objective]
    columns = (
        "format",
        "KV cache",
        "kernels",
        "threads",
        "KL",
        "top-1",
        "ppl ratio",
        "decode tok/s",
        "prefill tok/s",
        "peak MiB",
        "disk MiB",
        "predicted decode",
        "status",
    )
    rows = []
    for e in sorted(result.entries, key=lambda e: (e.get("kl_mean") is None, e.get("kl_mean") or 0)):
        c, p = e["candidate"], e.get("predicted", {})
        status = e.get("skipped") or ("within budget" if e.get("within_budget") else "over budget")
        if result.best is not None and e["key"] == result.best["key"]:
            status = "<b>chosen</b>"
        elif any(f["key"] == e["key"] for f in result.front):
            status += ", on the front"
        cells = (
            c["format"],
            c["kv_cache"],
            c.get("kernels", "auto"),
            c["threads"],
            _num(e.get("kl_mean"), 4),
            _pct(e.get("top1_agreement")),
            _num(e.get("ppl_ratio"), 4),
            _num(e.get("decode_tok_s"), 1),
            _num(e.get("prefill_tok_s"), 1),
            _num(e.get("peak_rss_mib"), 0),
            _num(None if e.get("disk_bytes") is None else e["disk_bytes"] / 2**20, 1),
            _num(p.get("decode_tok_s"), 1),
            status,
        )
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{cell if i == len(cells) - 1 else html.escape(str(cell))}</td>" for i, cell in enumerate(cells)
            )
            + "</tr>"
        )
    image = ""
    if png is not None:
        data = base64.b64encode(Path(png).read_bytes()).decode()
        image = f'<img alt="Pareto front" src="data:image/png;base64,{data}">'
    machine_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in machine.items()
    )
    command_lines = "\n".join(html.escape(c) for c in commands)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}pre{{background:#f4f4f4;padding:1em}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Objective: <b>{html.escape(LABELS[metric])}</b>; budget: <b>{html.escape(result.budget.describe())}</b>.
Chosen: <b>{html.escape(result.best["candidate"]["format"] if result.best else "none meets the budget")}</b>.</p>
{image}
<h2>Candidates</h2>
<table><tr>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{"".join(rows)}</table>
<h2>Machine</h2><table>{machine_rows}</table>
<h2>Commands</h2><pre>{command_lines}</pre>
</body></html>
"""


def _num(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"
