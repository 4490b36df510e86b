"""int8 quantization settings side by side on one run's model: test macro F1 of each against fp32.

Exports nothing new: takes RUN_DIR's fp32 ONNX form (`maxmin-inspect compress RUN_DIR` first),
quantizes it with ONNX Runtime under each setting below, calibrated on the same training images,
and scores every result on the run's test images in one run.

    python bench/quant_bench.py runs/neu-compress --model baseline \
        --out bench/results/quant-neu-baseline.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspectlib import onnxform  # noqa: E402
from inspectlib.checkpoint import preprocess_of, read_meta  # noqa: E402
from training.compress import _split_arrays  # noqa: E402
from training.engine import macro_f1  # noqa: E402


def main() -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--model", default="baseline")
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = json.loads((args.run_dir / "report.json").read_text())
    pre = preprocess_of(read_meta(args.run_dir / report["models"][args.model]["checkpoint"]))
    test_x, labels = _split_arrays(args.run_dir, pre, "test", None)
    calib, _ = _split_arrays(args.run_dir, pre, "train", args.calibration)
    classes = report["dataset"]["classes"]
    y = np.array([classes.index(c) for c in labels])

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"images": calib[i : i + 32]} for i in range(0, len(calib), 32))

        def get_next(self):  # noqa: ANN201
            return next(self.it, None)

    def score(path: Path) -> float:
        sess = onnxform.session(path, 2)
        return macro_f1(y, onnxform.run(sess, test_x).argmax(1), len(classes))

    fp32 = onnxform.form_path(args.run_dir, args.model, "fp32")
    base = dict(
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=["Conv", "Gemm", "MatMul"],
    )
    settings = {
        "per-channel, full-range weights": {},
        "per-channel, 7-bit weights (reduce_range; the trainer's choice)": {"reduce_range": True},
        "per-tensor weights": {"per_channel": False},
        "percentile calibration": {"calibrate_method": CalibrationMethod.Percentile},
        "int8 activations": {"activation_type": QuantType.QInt8},
    }
    results = {"run": str(args.run_dir), "model": args.model, "fp32_macro_f1": score(fp32)}
    print(f"fp32: macro F1 {results['fp32_macro_f1'] * 100:.1f}%")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        for k, (name, extra) in enumerate(settings.items()):
            out = Path(tmp) / f"q{k}.onnx"
            quantize_static(str(prepared), str(out), Batches(), **(base | extra))
            results[name] = score(out)
            print(f"{name}: macro F1 {results[name] * 100:.1f}%", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
