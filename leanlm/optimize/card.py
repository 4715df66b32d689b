"""The quality card of an optimized artifact: card.json (machine-readable) and README.md (a Hugging Face model
card: YAML front matter, then the measured quality and speed and the machine), and `check_card`, which
re-measures an artifact on the card's held-out text and says whether it still meets the card's budget."""

from __future__ import annotations

import json
from pathlib import Path

from leanlm.errors import InvalidRequestError

CARD = "card.json"
README = "README.md"


def card_load_path(folder: Path, card: dict) -> Path:
    return folder / card["load"]["path"]


def read_card(folder: str | Path) -> tuple[Path, dict]:
    folder = Path(folder)
    path = folder / CARD
    if not path.is_file():
        raise InvalidRequestError(
            f"{folder} has no {CARD}. `leanlm eval --card` checks an artifact written by `leanlm optimize`."
        )
    return folder, json.loads(path.read_text())


def write_card_files(folder: Path, card: dict) -> None:
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (folder / README).write_text(model_card_markdown(card))


def model_card_markdown(card: dict) -> str:
    q, s, m = card["quality"], card["speed"], card["machine"]
    held_out = card.get("held_out_quality")
    source = Path(card["source"]).name
    lines = [
        "---",
        "library_name: leanlm",
        f"base_model: {source}",
        "tags:",
        "- leanlm",
        f"- {card['format']['name']}",
        "- quantized" if card["format"]["method"] not in ("source", "dense") else "- original-weights",
        "---",
        "",
        f"# {source}, {card['format']['name']} (leanlm optimize)",
        "",
        f"Chosen by `leanlm optimize` as the best **{card['objective']}** configuration within the budget "
        f"**{card['budget_text']}** on the machine below. Every figure was measured, none predicted.",
        "",
        f"- format: `{card['format']['name']}`: {card['format']['note']}",
        f"- run it: `{card['command']}`",
        f"- check it: `leanlm eval --card {card['name']}` re-measures quality and says whether it still meets "
        "this card",
        "",
        "## Quality against the original",
        "",
        f"KL(original || this) in nats per token, top-1 agreement and perplexity ratio on wiki text "
        f"({card['eval']['context']}-token windows every {card['eval']['stride']}); GPTQ/AWQ calibrate on c4, "
        "never on it.",
        "",
        "| text | tokens | KL | top-1 | perplexity ratio |",
        "|---|---|---|---|---|",
        f"| search half | {q['eval_tokens']} | {q['kl_mean']:.4f} | {100 * q['top1_agreement']:.1f}% | "
        f"{q['ppl_ratio']:.4f} |",
    ]
    if held_out:
        lines.append(
            f"| held-out half (never seen by the search) | {held_out['eval_tokens']} | {held_out['kl_mean']:.4f} | "
            f"{100 * held_out['top1_agreement']:.1f}% | {held_out['ppl_ratio']:.4f} |"
        )
    lines += [
        "",
        "## Speed and size on this machine",
        "",
        "| decode tok/s | prefill tok/s | peak RSS | on disk |",
        "|---|---|---|---|",
        f"| {s['decode_tok_s']:.1f} | {s['prefill_tok_s']:.1f} | {s['peak_rss_mib']:.0f} MiB | "
        f"{card['disk_bytes'] / 2**20:.1f} MiB |",
        "",
        f"Batch 1, {s['prompt_tokens']}-token prompt, {s['gen_tokens']} new tokens, {s['threads']} threads, the bench "
        f"engine in a fresh process, median of {s['samples']} runs.",
        "",
        "## Machine",
        "",
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, torch {m.get('torch')}, "
        f"Python {m.get('python')}, load average {m.get('load_average')}.",
        "",
    ]
    return "\n".join(lines)


def check_card(folder: str | Path, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Re-measure quality on the card's held-out text and compare with its budget. Returns
    {"meets": bool, "violations": [...], "quality": {...}, "card": card}."""
    from leanlm.engine.llm import LLM
    from leanlm.evaluate import evaluate
    from leanlm.evaluate.corpus import corpus_text
    from leanlm.optimize.measure import split_text
    from leanlm.optimize.search import Budget

    folder, card = read_card(folder)
    source = card["source"]
    if not Path(source).exists():
        raise InvalidRequestError(f"The card's original model {source} is not there; KL needs it as the baseline.")
    options = card["load"]["options"]
    llm = LLM(card_load_path(folder, card), device="cpu", **options)
    baseline = LLM(source, dtype="bfloat16", device="cpu", dequantize=True)
    _, held_out = split_text(corpus_text(card["eval"]["corpus"], quiet=True))
    result = evaluate(
        llm,
        held_out,
        corpus=f"{card['eval']['corpus']} (held-out half)",
        context=card["eval"]["context"],
        stride=card["eval"]["stride"],
        max_tokens=max_tokens or card["eval"]["held_out_tokens"],
        baseline=baseline,
        progress=progress,
    )
    quality = {
        "kl_mean": result.kl_mean,
        "ppl_ratio": result.ppl_ratio,
        "top1_agreement": result.top1_agreement,
        "eval_tokens": result.num_tokens,
    }
    violations = Budget(**card["budget"]).violations(quality)
    return {"meets": not violations, "violations": violations, "quality": quality, "card": card}
