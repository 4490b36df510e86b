"""Charts both the PoC report and the service's dashboard draw, as inline SVG (matplotlib, no
display needed)."""

from __future__ import annotations

import io
from typing import Any


def pyplot():  # noqa: ANN201
    """matplotlib's pyplot on the file-only backend, imported on first use: the service draws a
    chart only when a manager opens the dashboard."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


COLORS = {"baseline": "#4c72b0", "maxmin": "#dd8452", "maxmin_half": "#55a868"}


def svg(fig) -> str:  # noqa: ANN001
    """The figure as an inline SVG element; closes it."""
    plt = pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def accuracy_cost_chart(report: dict[str, Any]) -> str:
    """The report's metric on the test set (mean, with the spread over seeds) against parameters
    and latency."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4))
    metric = (report.get("metric") or {}).get("name", "accuracy")
    label = {"macro_f1": "macro F1"}.get(metric, metric)
    for name, m in report["models"].items():
        acc = m[metric]
        if acc["mean"] is None:
            continue
        err = (acc["std"] or 0) * 100
        for ax, x in zip(axes, (m["params"], m["latency_p50_ms"]), strict=True):
            ax.errorbar(
                x,
                acc["mean"] * 100,
                yerr=err,
                fmt="o",
                capsize=4,
                ms=8,
                color=COLORS.get(name),
                label=name,
            )
            ax.annotate(name, (x, acc["mean"] * 100), textcoords="offset points", xytext=(6, 6))
    axes[0].set_xlabel("parameters")
    axes[1].set_xlabel(
        f"latency p50, batch 1 (ms, {next(iter(report['models'].values()))['latency_device']})"
    )
    for ax in axes:
        ax.set_ylabel(f"test {label} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{label.capitalize()} versus cost (mean ± std over seeds)")
    return svg(fig)
