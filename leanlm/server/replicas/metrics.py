"""One /metrics for all replicas: every replica's Prometheus text, each sample labelled with its replica, grouped
under one HELP/TYPE header per metric as the text format requires."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (.*)")


def label_sample(line: str, replica: str) -> str:
    match = _SAMPLE.fullmatch(line)
    if not match:
        return line
    name, labels, value = match.groups()
    inner = f'replica="{replica}"' + (f",{labels[1:-1]}" if labels and labels != "{}" else "")
    return f"{name}{{{inner}}} {value}"


def merge_metrics(texts: dict[str, str], extra: list[str] | None = None) -> str:
    """texts: replica id -> its /metrics text. Families keep the order of their first appearance."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                if line not in headers.setdefault(family, []):
                    headers[family].append(line)
                samples.setdefault(family, [])
            elif line.strip() and family is not None:
                samples[family].append(label_sample(line, replica))
    lines = list(extra or [])
    for family, header in headers.items():
        lines += header + samples[family]
    return "\n".join(lines) + "\n"
