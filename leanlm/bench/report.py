"""Human-readable output of a benchmark report: a terminal table and a PNG plot."""

from __future__ import annotations

import sys
from pathlib import Path

from leanlm.errors import InvalidRequestError


def format_table(report: dict) -> str:
    spec = report["spec"]
    lines = [
        f"model {Path(report['model']['path']).name}  |  {spec['threads']} threads on {report['machine']['cpu']}  |  "
        f"prompt {spec['prompt_tokens']} tok, generate {spec['gen_tokens']} tok (EOS ignored)  |  "
        f"median of {spec['repetitions']} runs [min-max]",
    ]
    if report.get("bandwidth_gbs"):
        lines.append(f"memory bandwidth probe: {report['bandwidth_gbs']:.1f} GB/s")
    load = report["machine"].get("load_average")
    if load and None not in load:
        lines.append(f"load average (1 min) at the start and end of the run: {load[0]:.2f}, {load[1]:.2f}")
    header = [
        "engine",
        "precision",
        "batch",
        "load s",
        "TTFT ms",
        "prefill tok/s",
        "GFLOP/s",
        "decode tok/s",
        "ms/token",
        "roofline",
        "peak RSS MiB",
        "load",
        "vs",
    ]
    table = [header]
    for row in report["rows"]:
        vs = row.get("vs")
        table.append(
            [
                row["engine"],
                row["precision"],
                str(row["batch"]),
                f"{row['load_s']['median']:.2f}",
                f"{1e3 * row['ttft_s']['median']:.0f}",
                _spread(row["prefill_tok_s"], "{:.0f}"),
                f"{row['prefill_gflop_s']:.1f}",
                _spread(row["decode_tok_s"], "{:.1f}"),
                f"{row['ms_per_token']['median']:.1f}",
                f"{row['roofline_pct']:.0f}% of {row['decode_bound_tok_s']:.0f}" if "roofline_pct" in row else "-",
                f"{row['peak_rss_mib']['median']:.0f}",
                "{:.1f}-{:.1f}".format(*row["load_average"]) if row.get("load_average") else "-",
                f"decode {vs['decode']:.2f}x, prefill {vs['prefill']:.2f}x" if vs else "",
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for index, cells in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    for row in report["rows"]:
        for note in row.get("notes", []):
            lines.append(f"note: {row['engine']} {row['precision']}: {note}")
    return "\n".join(lines)


def _spread(stats: dict, fmt: str) -> str:
    return f"{fmt.format(stats['median'])} [{fmt.format(stats['min'])}-{fmt.format(stats['max'])}]"


def save_plot(report: dict, path: str | Path) -> None:
    """Decode tok/s per engine and precision (batch 1), each bar next to its roofline bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidRequestError("--plot needs matplotlib: pip install matplotlib") from exc
    rows = [r for r in report["rows"] if r["batch"] == min(x["batch"] for x in report["rows"])]
    labels = [f"{r['engine']}\n{r['precision']}" for r in rows]
    medians = [r["decode_tok_s"]["median"] for r in rows]
    errors = [
        [m - r["decode_tok_s"]["min"] for m, r in zip(medians, rows, strict=True)],
        [r["decode_tok_s"]["max"] - m for m, r in zip(medians, rows, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
    positions = range(len(rows))
    ax.bar(positions, medians, yerr=errors, capsize=4, color="tab:blue", label="measured (median, min-max)")
    bounds = [r.get("decode_bound_tok_s") for r in rows]
    if all(bounds):
        ax.scatter(positions, bounds, marker="_", s=900, color="tab:red", label="roofline bound (bandwidth / bytes)")
    ax.set_xticks(list(positions), labels)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"{Path(report['model']['path']).name}, {report['spec']['threads']} threads")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_sample(repetition: int, engine, sample: dict) -> None:
    """One progress line per finished sample (and its notes, e.g. a llama.cpp fallback), on stderr."""
    name = f"{engine.engine} {engine.label or sample['precision']}"
    run = sample["runs"][0]
    print(
        f"  run {repetition + 1}: {name} decode {run['decode_tok_s']:.1f} tok/s, "
        f"prefill {run['prefill_tok_s']:.0f} tok/s",
        file=sys.stderr,
        flush=True,
    )
    for note in sample.get("notes", []):
        print(f"  note: {name}: {note}", file=sys.stderr, flush=True)
