"""Structured pruning at several keep fractions, beside the fine-tune alone, on one trained run.

For each fraction, a copy of RUN_DIR goes through `maxmin-inspect compress --prune KEEP`: every
model's filters pruned to KEEP, fine-tuned for the same epochs, exported and quantized. KEEP=1
prunes nothing and fine-tunes the same epochs: the control that tells pruning's effect from the
extra training's. Each copy's study times its forms in the same rounds, so the latency ratios
(pruned against the unpruned ONNX fp32 form) are side by side; absolute times are not.

    python bench/prune_bench.py runs/neu-compress --keep 1 0.5 0.25 \
        --out bench/results/prune-neu-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.compress import PRUNE_EPOCHS, compress_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--epochs", type=int, default=PRUNE_EPOCHS)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for keep in args.keep:
            run = Path(tmp) / f"keep-{keep}"
            shutil.copytree(args.run_dir, run, ignore=shutil.ignore_patterns("compressed"))
            study = compress_run(run, rounds=args.rounds, prune=keep, prune_epochs=args.epochs)
            for name, m in study["models"].items():
                f, q = m["forms"], m["pruning"]
                for form in ("pruned-fp32", "pruned-int8"):
                    rows.append(
                        {
                            "keep": keep,
                            "model": name,
                            "form": form,
                            "widths": q["widths"],
                            "params": q["params"],
                            "params_before": q["params_before"],
                            "macro_f1_fp32": f["torch-fp32"]["macro_f1"],
                            "macro_f1_before_fine_tune": q["fine_tune"]["test_macro_f1_before"],
                            "macro_f1": f[form]["macro_f1"],
                            "mcnemar_p": f[form]["mcnemar_vs_fp32"]["p_value"],
                            "bytes": f[form]["weights_bytes"],
                            "bytes_onnx_fp32": f["onnx-fp32"]["weights_bytes"],
                            "latency_ratio_p50": f[form]["latency_ms_p50"]
                            / f["onnx-fp32"]["latency_ms_p50"],
                            "throughput_ratio": f[form]["images_per_second_batch32"]
                            / f["onnx-fp32"]["images_per_second_batch32"],
                            "fine_tune_seconds": q["fine_tune"]["seconds"],
                        }
                    )
    print(
        f"{'keep':>5} {'model':<12} {'form':<12} {'F1 fp32':>8} {'unTuned':>8} {'F1':>6} "
        f"{'p':>5} {'params':>9} {'KiB':>6} {'lat/fp32':>8} {'thr/fp32':>8}"
    )
    for r in rows:
        print(
            f"{r['keep']:>5} {r['model']:<12} {r['form']:<12} {r['macro_f1_fp32'] * 100:8.1f} "
            f"{r['macro_f1_before_fine_tune'] * 100:8.1f} {r['macro_f1'] * 100:6.1f} "
            f"{r['mcnemar_p']:5.2f} {r['params']:>9,} {r['bytes'] / 1024:6.0f} "
            f"{r['latency_ratio_p50']:8.2f} {r['throughput_ratio']:8.2f}"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"run": str(args.run_dir), "epochs": args.epochs, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
