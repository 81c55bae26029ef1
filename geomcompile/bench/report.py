"""Reporting a benchmark result: the table on stdout, the JSON file, the PNG bar chart."""
from __future__ import annotations

import json
import os
from collections import OrderedDict

PHASE_TITLES = {"optimizer_step": "optimizer step", "train_step": "full training step (forward, backward, step)"}


def variant_label(row: dict) -> str:
    if row["variant"] == "plain":
        base = row.get("base_optimizer", "")
        impl = "fused" if "fused=True" in base else "foreach" if "foreach=True" in base else "default"
        return f"plain {base.split('(')[0]} ({impl})"
    if row["variant"] == "copy":
        return "copy bound"
    return f"{row['geometry']} {row['variant']}"


def _base(result: dict) -> str:
    bases = list(dict.fromkeys(r["base_optimizer"] for r in result["results"]
                               if r.get("base_optimizer") and r["variant"] != "copy"))
    return "; ".join(bases) + (" (CUDA: triton rows use the default implementation, which the Triton backend "
                               "can fuse)" if len(bases) > 1 else "")


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def sections(result: dict) -> "OrderedDict[tuple[str, str], list[dict]]":
    out: OrderedDict = OrderedDict()
    for row in result["results"]:
        out.setdefault((row["workload"], row["phase"]), []).append(row)
    return out


def format_table(result: dict) -> str:
    s, dev = result["settings"], result["device"]
    lines = [f"geomcompile bench: {s['model']} on {dev['type']} ({dev['name']}, {dev['torch_threads']} threads), "
             f"torch {result['torch']}, {result['date']}, load average {result['load_average']['before']} "
             f"before / {result['load_average']['after']} after",
             f"base optimizer: {_base(result)}",
             f"optimizer step: median of {s['steps']} timed steps after {s['warmup']} warm-up "
             f"({s['timer']}); spread p10-p90",
             (f"full training step: {s['train_steps']} timed steps after {s['train_warmup']} warm-up, "
              f"batch {s['batch_size']}, random data" if s["train_steps"] else "full training step: not run"),
             f"{result['counting']['bytes']}",
             f"launches: {result['counting']['launches']}",
             "x plain: time / plain optimizer's time; x copy: time / time of a copy moving the same bytes"]
    notes: list[str] = []
    reasons: set[str] = set()
    for (workload, phase), rows in sections(result).items():
        info = result["workloads"].get(workload, {})
        lines += ["", f"{workload} ({info.get('parameters', 0):,} parameters in {info.get('tensors', 0)} tensors)"
                      f": {PHASE_TITLES[phase]}"]
        optimizer = phase == "optimizer_step"
        header = ["variant", "median ms", "p10-p90 ms"] + (["MB/step", "GB/s"] if optimizer else []) + \
                 ["launches", "x plain"] + (["x copy"] if optimizer else [])
        table = [header]
        for row in rows:
            label = variant_label(row)
            if row["status"] != "ok":
                seen = row["reason"] in reasons
                reasons.add(row["reason"])
                table.append([label, "skipped (reason above)" if seen else f"skipped: {row['reason']}"])
                continue
            cells = [label, _ms(row["median_ms"]), f"{_ms(row['p10_ms'])}-{_ms(row['p90_ms'])}"]
            if optimizer:
                cells += [_fmt(row["bytes_per_step"] and row["bytes_per_step"] / 1e6, ".2f"),
                          _fmt(row["gb_per_s"], ".2f")]
            cells += [str(row["launches_per_step"]), _fmt(row.get("x_plain"), ".2f")]
            if optimizer:
                cells.append(_fmt(row.get("x_copy"), ".2f"))
            table.append(cells)
            for note in row.get("notes", []):
                text = f"{workload} {label}: {note}"
                if text not in notes:
                    notes.append(text)
        lines += _align(table)
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def _align(table: list[list[str]]) -> list[str]:
    full = [r for r in table if len(r) == len(table[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(table[0]))]
    out = []
    for r in table:
        if len(r) != len(table[0]):          # a skipped row: label, then the reason across the columns
            out.append(f"{r[0].ljust(widths[0])}  {r[1]}")
            continue
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return out


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")


def write_png(result: dict, path: str) -> None:
    """One horizontal bar chart per (workload, phase): median time, p10-p90 whiskers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [(key, [r for r in rows if r["status"] == "ok"]) for key, rows in sections(result).items()]
    groups = [(key, rows) for key, rows in groups if rows]
    height = sum(0.35 * len(rows) + 0.9 for _, rows in groups) + 0.5
    fig = Figure(figsize=(9, max(height, 2.5)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [max(len(rows), 1) for _, rows in groups]})[:, 0]
    colours = {"plain": "#4c72b0", "eager": "#dd8452", "compile": "#55a868", "triton": "#8172b3", "copy": "#937860"}
    for ax, ((workload, phase), rows) in zip(axes, groups):
        labels = [variant_label(r) for r in rows]
        med = [r["median_ms"] for r in rows]
        err = [[m - r["p10_ms"] for m, r in zip(med, rows)], [r["p90_ms"] - m for m, r in zip(med, rows)]]
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, med, xerr=err, color=[colours.get(r["variant"], "#999999") for r in rows], capsize=3)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_xlabel("ms per step (median, p10-p90)", fontsize=8)
        ax.set_title(f"{workload}: {PHASE_TITLES[phase]}", fontsize=9)
        for y, m, r in zip(ys, med, rows):
            ratio = r.get("x_plain")
            ax.text(max(m, r["p90_ms"]), y, f"  {_ms(m)} ms" + (f"  x{ratio:.2f}" if ratio else ""),
                    va="center", fontsize=7)
        ax.margins(x=0.25)
    dev = result["device"]
    fig.suptitle(f"geomcompile bench, {dev['type']} ({dev['name']}), torch {result['torch']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
