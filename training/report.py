"""The HTML side of the PoC report: one self-contained page, charts inline as SVG.

It is rendered from report.json alone, so ``maxmin-inspect report RUN_DIR`` can re-render it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from inspectlib.charts import COLORS, accuracy_cost_chart, pyplot, svg


def curves_chart(report: dict[str, Any]) -> str:
    """Training loss and validation accuracy per epoch, every seed drawn thin, the mean thick."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4))
    for name, m in report["models"].items():
        color = COLORS.get(name)
        for key, ax in (("train_loss", axes[0]), ("val_score", axes[1])):
            series = [c.get(key) or c.get("val_accuracy") for c in m["curves"]]
            series = [s for s in series if s]
            for s in series:
                ax.plot(range(1, len(s) + 1), s, color=color, alpha=0.25, lw=1)
            n = min((len(s) for s in series), default=0)
            if n:
                mean = [sum(s[i] for s in series) / len(series) for i in range(n)]
                ax.plot(range(1, n + 1), mean, color=color, lw=2, label=name)
    axes[0].set_title("training loss")
    metric = (report.get("metric") or {}).get("name", "accuracy")
    axes[1].set_title(f"validation {metric.replace('macro_f1', 'macro F1')}")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend()
    return svg(fig)


def confusion_chart(name: str, matrix: list[list[int]], classes: list[str]) -> str:
    """A confusion matrix as a heat map with counts (rows: true class, columns: predicted)."""
    size = max(3.0, 0.55 * len(classes) + 1.5)
    fig, ax = pyplot().subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    top = max((max(r) for r in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                color="white" if v > top / 2 else "black",
                fontsize=8,
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(name)
    return svg(fig)


def operating_chart(report: dict[str, Any]) -> str | None:
    """Per model: the share of parts sent to review against the rate the threshold bounds, over
    the thresholds, with the chosen point marked (validation split)."""
    points = {n: m.get("operating_point") for n, m in report["models"].items()}
    points = {n: p for n, p in points.items() if p}
    if not points:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.4))
    kind = next(iter(points.values()))["kind"]
    for name, p in points.items():
        xs = [c["review_rate"] * 100 for c in p["curve"]]
        ys = [c["rate"] * 100 for c in p["curve"]]
        ax.plot(xs, ys, color=COLORS.get(name), label=name)
        v = p["validation"]
        ax.plot(v["review_rate"] * 100, v["rate"] * 100, "o", color=COLORS.get(name), ms=8)
    target = next(iter(points.values()))["target"] * 100
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("parts sent to review (%)")
    ax.set_ylabel(f"{kind.replace('_', ' ')} (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Operating point (validation split; dot: chosen, dashed: target)")
    return svg(fig)


def render_html(report: dict[str, Any]) -> str:
    """The report page as one HTML string."""
    env = Environment(loader=PackageLoader("training", "templates"), autoescape=select_autoescape())
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{v * 100:.1f}%"
    env.filters["pts"] = lambda v: "n/a" if v is None else f"{v * 100:+.1f}"
    charts = {
        "cost": accuracy_cost_chart(report),
        "curves": curves_chart(report),
        "operating": operating_chart(report),
        "confusion": {
            name: confusion_chart(name, m["confusion_matrix"], report["dataset"]["classes"])
            for name, m in report["models"].items()
        },
    }
    return env.get_template("report.html").render(r=report, charts=charts)


def write_html(report: dict[str, Any], path: Path) -> Path:
    """Render ``report`` to ``path``."""
    Path(path).write_text(render_html(report), encoding="utf-8")
    return Path(path)


def read_report(run_dir: Path) -> dict[str, Any]:
    """The report.json of ``run_dir``; raises naming the file when it is missing or damaged."""
    src = Path(run_dir) / "report.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: is {run_dir} a run directory?")
    try:
        return json.loads(src.read_text())
    except ValueError as exc:
        raise ValueError(f"{src} is not valid JSON: {exc}") from None


def rerender(run_dir: Path) -> Path:
    """Re-render report.html from the report.json in ``run_dir``."""
    return write_html(read_report(run_dir), Path(run_dir) / "report.html")
