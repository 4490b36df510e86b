"""int8 by ONNX Runtime (the trainer's choice) beside int8 by PyTorch's PT2E flow, on one run.

For each model of RUN_DIR (compressed first: `maxmin-inspect compress RUN_DIR`), in one run:

- PyTorch fp32, eager: the reference;
- ONNX Runtime int8: the run's ``compressed/<model>.int8.onnx``, as the service runs it;
- PT2E int8: ``torch.export``, torchao's ``X86InductorQuantizer`` (its default static config),
  calibrated on the same training images (the model with each ReLU before its pooling, the
  same function, see ``relu_before_pool``), then ``torch.compile`` (Inductor, freezing on), the
  lowering that turns its quantize/dequantize pattern into int8 kernels; one graph for batch 1 and
  one for batch 32.

Each gets test macro F1, its answers' agreement with fp32, and CPU latency p50/p99 at batch 1 and
images/s at batch 32, all timed in the same interleaved rounds with one thread. PT2E's compile
time is recorded too: a service pays it at every start.

    pip install torchao   # PT2E lives in torchao; the product does not need it
    python bench/pt2e_bench.py runs/neu-compress --out bench/results/pt2e-neu-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspectlib import onnxform  # noqa: E402
from inspectlib.checkpoint import load_checkpoint, preprocess_of, read_meta  # noqa: E402
from models.layers import MaxMinPool, ReluPool  # noqa: E402
from training.compress import CALIBRATION_IMAGES, _split_arrays, _timings  # noqa: E402
from training.engine import macro_f1  # noqa: E402


def relu_before_pool(model: torch.nn.Module) -> torch.nn.Module:
    """The same function with every pooling after its ReLU. Inductor's int8 lowering of a max
    pool that directly follows a quantized convolution drops ``ceil_mode`` (the graph fails to
    compile: the flattened size no longer matches), and both of the product's pooling layers
    pool first on the CPU because it moves less memory."""
    for m in model.modules():
        if isinstance(m, MaxMinPool):
            m.fused = False  # maxmin, then pool
        elif isinstance(m, ReluPool):
            m.forward = lambda x, m=m: F.max_pool2d(
                F.relu(x), m.kernel_size, m.stride, ceil_mode=True
            )
    return model


def pt2e_int8(wrapped: torch.nn.Module, calib: np.ndarray, batch: int):
    """The PT2E flow as torchao documents it for x86 CPUs, for one batch size (Inductor's
    lowering of this graph failed with a dynamic batch); returns (compiled model, seconds)."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    t0 = time.perf_counter()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    example = torch.from_numpy(calib[:batch])
    with torch.no_grad():
        graph = torch.export.export(wrapped, (example,)).module()
        prepared = prepare_pt2e(graph, quantizer)
        for i in range(0, len(calib) - batch + 1, batch):
            prepared(torch.from_numpy(calib[i : i + batch]))
        converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(example)
    return compiled, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    report = json.loads((args.run_dir / "report.json").read_text())
    classes = report["dataset"]["classes"]
    results: dict = {"run": str(args.run_dir), "torch": torch.__version__, "models": {}}
    runners = {}
    for name, entry in report["models"].items():
        if not entry.get("checkpoint"):
            continue
        checkpoint = args.run_dir / entry["checkpoint"]
        pre = preprocess_of(read_meta(checkpoint))
        test_x, labels = _split_arrays(args.run_dir, pre, "test", None)
        calib, _ = _split_arrays(args.run_dir, pre, "train", CALIBRATION_IMAGES)
        y = np.array([classes.index(c) for c in labels])
        model, _ = load_checkpoint(checkpoint, device="cpu")
        mean, std = pre.tensors("cpu")
        wrapped = onnxform._Deployable(model, mean, std).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same = onnxform._Deployable(relu_before_pool(copy.deepcopy(model)), mean, std).eval()
            one, one_s = pt2e_int8(same, calib, 1)
            many, many_s = pt2e_int8(same, calib, 32)
        sess = onnxform.session(onnxform.form_path(args.run_dir, name, "int8"), 1)

        def fp32(a: np.ndarray, w=wrapped) -> np.ndarray:
            with torch.inference_mode():
                return w(torch.from_numpy(a)).numpy()

        def pt2e(a: np.ndarray, one=one, many=many) -> np.ndarray:
            with torch.no_grad():
                if len(a) == 1:
                    return one(torch.from_numpy(a)).numpy()
                pad = np.zeros((32 - len(a), *a.shape[1:]), a.dtype)  # a short last batch
                return many(torch.from_numpy(np.concatenate([a, pad])))[: len(a)].numpy()

        def ort(a: np.ndarray, s=sess) -> np.ndarray:
            return onnxform.run(s, a)

        sides = {"torch-fp32": fp32, "onnxruntime-int8": ort, "pt2e-int8": pt2e}
        preds = {
            k: np.concatenate([f(test_x[i : i + 32]) for i in range(0, len(test_x), 32)]).argmax(1)
            for k, f in sides.items()
        }
        results["models"][name] = {
            k: {
                "macro_f1": macro_f1(y, pr, len(classes)),
                "same_answers_as_fp32": float(np.mean(pr == preds["torch-fp32"])),
            }
            for k, pr in preds.items()
        }
        results["models"][name]["pt2e-int8"]["prepare_and_compile_seconds"] = one_s + many_s
        runners.update({f"{name}/{k}": f for k, f in sides.items()})
        print(name, {k: round(v["macro_f1"] * 100, 1) for k, v in results["models"][name].items()})
    timing = _timings(runners, pre, args.rounds)
    for key, t in timing.items():
        name, side = key.split("/")
        results["models"][name][side].update(t)
        print(
            f"{key}: p50 {t['latency_ms_p50']:.2f} ms, p99 {t['latency_ms_p99']:.2f} ms, "
            f"{t['images_per_second_batch32']:.0f} img/s at batch 32"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
