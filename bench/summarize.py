"""Print a run's report.json as the Markdown table used in BENCHMARKS.md.

Usage: python bench/summarize.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(run_dir: Path) -> str:
    """One Markdown table: accuracy with spread, cost and time per model, then the verdict."""
    r = json.loads((run_dir / "report.json").read_text())
    run = r["run"]
    lines = [
        f"Device: {run['device']} ({run['device_name']}), {run['cpu_threads']} CPU thread(s), "
        f"torch {run['torch']}; whole run {run['wall_seconds']:.0f} s "
        f"(decoding {run['data_seconds']:.1f} s{', cached' if run['data_from_cache'] else ''}).",
        "",
        *_header(
            "model", "test accuracy (mean ± std)", "per seed", "macro F1", "params", "MFLOPs/img",
            "train s (all seeds)", "latency p50/p99 ms", "img/s at batch 64", "peak memory MB",
        ),
    ]  # fmt: skip
    for name, m in r["models"].items():
        acc = m["accuracy"]
        std = f" ± {acc['std'] * 100:.1f}" if acc["std"] is not None else ""
        mean = "n/a" if acc["mean"] is None else f"{acc['mean'] * 100:.1f}{std}"
        seeds = ", ".join(f"{a * 100:.1f}" for a in acc["per_seed"])
        f1 = m["macro_f1"]["mean"]
        dev = m["latency_device"]
        lat = m["latency_ms"][dev]
        lines.append(
            f"| {name} | {mean} | {seeds} | {'n/a' if f1 is None else f'{f1 * 100:.1f}'} "
            f"| {m['params']:,} | {m['flops'] / 1e6:.1f} | {m['train_seconds']['total']:.1f} "
            f"| {lat['p50']:.2f} / {lat['p99']:.2f} | {m['throughput'][dev]:.0f} "
            f"| {m['peak_memory_bytes'] / 1e6:.1f} |"
        )
    lines += [
        "",
        *_header(
            "against baseline", "accuracy difference, points (95% CI)", "McNemar p<0.05 seeds",
            "params", "latency", "train time",
        ),
    ]  # fmt: skip
    for name, c in r["comparison"].items():
        d = c["accuracy_difference"]
        ci = "n/a" if d["low"] is None else f"{d['low'] * 100:+.1f} to {d['high'] * 100:+.1f}"
        lines.append(
            f"| {name} | {d['mean'] * 100:+.1f} ({ci}) | {c['mcnemar_significant_seeds']} of "
            f"{len(c['mcnemar'])} | {c['params_ratio']:.2f}x | {c['latency_ratio']:.2f}x "
            f"| {c['train_time_ratio']:.2f}x |"
        )
    lines += ["", f"Verdict: {r['verdict']}"]
    return "\n".join(lines)


def _header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"### {arg}\n\n{table(Path(arg))}\n")
