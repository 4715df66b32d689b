"""Mixed precision: probe each layer's sensitivity, then give the most sensitive ones more bits within a size margin.

`plan_mixed` returns the QuantConfig with its per-layer bits (layer_bits) filled in, and the report that
quantization.json records: each group's measured KL at every width probed, its size and the bits it got.
"""

from __future__ import annotations

import dataclasses

from leanlm.compress.allocate import allocate_bits, stored_bytes
from leanlm.compress.config import QuantConfig
from leanlm.compress.sensitivity import layer_sensitivity, probe_groups
from leanlm.errors import InvalidRequestError


def sensitivity_ids(llm, config: QuantConfig):
    """(S, T) c4 token ids for the probe: the calibration corpus (never the evaluation text), another seed."""
    from leanlm.compress.calibrated import calibration_tensor

    probe = dataclasses.replace(
        config,
        calibration_samples=config.sensitivity_samples,
        calibration_length=config.sensitivity_length,
        seed=config.seed + 1,
    )
    return calibration_tensor(llm, probe, None)


def group_sizes(model, config: QuantConfig, widths: tuple[int, ...]) -> dict[str, dict[int, int]]:
    """{group: {bits: bytes in the artifact}} for the probe's groups."""
    sizes = {}
    for group, names in probe_groups(model, config).items():
        shapes = [model.get_submodule(n).weight.shape for n in names]
        sizes[group] = {
            b: sum(stored_bytes(r, c, b, config.group_size, config.symmetric_at(b)) for r, c in shapes) for b in widths
        }
    return sizes


def sensitivity_report(llm, config: QuantConfig, widths: tuple[int, ...], progress: bool = False) -> dict:
    """The KL report per layer: each group's measured KL at every width in `widths` and its size in the artifact."""
    ids = sensitivity_ids(llm, config)
    kl = layer_sensitivity(llm.model, config, ids, widths, progress)
    sizes = group_sizes(llm.model, config, widths)
    return {
        "probe": {"corpus": "c4.utf8", "samples": int(ids.shape[0]), "tokens_per_sample": int(ids.shape[1])},
        "method": "round-to-nearest, one group at a time",
        "group_size": config.group_size,
        "granularity": config.mixed_granularity,
        "widths": list(widths),
        "groups": [
            {"group": g, "kl": {str(b): kl[g][b] for b in widths}, "bytes": {str(b): sizes[g][b] for b in widths}}
            for g in sorted(kl, key=sort_key)
        ],
    }


def reuse_report(report: dict, llm, config: QuantConfig, widths: tuple[int, ...]) -> dict:
    """A saved KL report checked against this model and config, cut to `widths`."""
    groups = probe_groups(llm.model, config)
    mismatch = [
        what
        for what, ok in (
            ("the group size", report.get("group_size") == config.group_size),
            ("the granularity", report.get("granularity") == config.mixed_granularity),
            (f"the widths {list(widths)}", set(widths) <= set(report.get("widths", []))),
            ("the layers", set(groups) <= {row["group"] for row in report.get("groups", [])}),
        )
        if not ok
    ]
    if mismatch:
        raise InvalidRequestError(
            f"The sensitivity report does not match this quantization ({', '.join(mismatch)}): rerun "
            "`leanlm sensitivity` with the same --group-size, --per and bits, or leave --sensitivity out."
        )
    rows = [
        {
            "group": r["group"],
            "kl": {str(b): r["kl"][str(b)] for b in widths},
            "bytes": {str(b): r["bytes"][str(b)] for b in widths},
        }
        for r in report["groups"]
        if r["group"] in groups  # a report may hold more (the LM head, which a tied int8 embedding takes over)
    ]
    return {**report, "widths": list(widths), "groups": rows}


def plan_mixed(llm, config: QuantConfig, progress: bool = False, saved: dict | None = None) -> tuple[QuantConfig, dict]:
    """Probe (or reuse the `saved` KL report), allocate, and return (the config with layer_bits, the report for
    quantization.json)."""
    widths = (config.bits, config.mixed_bits)
    if saved is not None:
        report = reuse_report(saved, llm, config, widths)
    else:
        report = sensitivity_report(llm, config, widths, progress)
    kl = {row["group"]: {b: row["kl"][str(b)] for b in widths} for row in report["groups"]}
    sizes = {row["group"]: {b: row["bytes"][str(b)] for b in widths} for row in report["groups"]}
    uniform = sum(s[config.bits] for s in sizes.values())
    budget = int(uniform * (1 + config.mixed))
    allocation = allocate_bits(kl, sizes, budget)
    for row in report["groups"]:
        row["bits"] = allocation[row["group"]]
    report.update(
        {
            "uniform_bytes": uniform,
            "budget_bytes": budget,
            "allocated_bytes": sum(sizes[g][b] for g, b in allocation.items()),
            "predicted_kl_sum": {
                "uniform": sum(k[config.bits] for k in kl.values()),
                "mixed": sum(kl[g][b] for g, b in allocation.items()),
            },
        }
    )
    layer_bits = sorted(((g, b) for g, b in allocation.items() if b != config.bits), key=lambda x: sort_key(x[0]))
    return dataclasses.replace(config, layer_bits=tuple(layer_bits)), report


def sort_key(group: str) -> tuple:
    """layers.2 before layers.10, the LM head last."""
    parts = group.split(".")
    return (0, int(parts[1]), group) if parts[0] == "layers" else (1, 0, group)


def sensitivity_table(report: dict) -> str:
    """The KL report per layer as a plain-text table (`leanlm sensitivity`, `leanlm quantize --mixed`)."""
    widths = report["widths"]
    allocated = all("bits" in row for row in report["groups"])
    header = f"{'group':<32}" + "".join(f"{f'KL@{b}bit':>12}" for b in widths) + f"{'MiB@' + str(widths[0]):>10}"
    lines = [header + (f"{'bits':>6}" if allocated else "")]
    for row in report["groups"]:
        kls = "".join(f"{row['kl'][str(b)]:>12.5f}" for b in widths)
        size = row["bytes"][str(widths[0])] / 2**20
        lines.append(f"{row['group']:<32}{kls}{size:>10.2f}" + (f"{row['bits']:>6}" if allocated else ""))
    return "\n".join(lines)
