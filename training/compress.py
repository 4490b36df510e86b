"""The compression study: each deployed model as fp32 PyTorch, fp32 ONNX and int8 ONNX.

For every model with a deployed checkpoint, ``compress_run``:

1. exports it to ONNX and checks the export against PyTorch on the run's test images (largest
   probability difference under ``EXPORT_TOLERANCE``, and the answers the same);
2. quantizes it to int8 with ONNX Runtime's static quantization, calibrated on images of the
   run's training split (``inspectlib.onnxform``);
3. with ``prune``, prunes whole filters (``models.slim``: the given fraction of each
   convolution's filters kept, by batch-norm scale) and fine-tunes the smaller network for a few
   epochs on the training split, with the model's own recipe at a tenth of its peak learning rate,
   keeping the best validation epoch; the pruned network is exported and quantized as above;
4. scores each form on the test images: accuracy and macro F1, the change against fp32 PyTorch and
   McNemar's exact test against it on the same images; the weights' bytes; CPU latency p50/p99 at
   batch 1 and images/s at batch 32, every form timed in the same rounds, one thread each.

The study goes into ``report.json`` (``compression``) and the report page, with a sentence for
the verdict on what MaxMin costs against the baseline once both are compressed.

ONNX Runtime's quantizer is used rather than PyTorch's PT2E flow, chosen by measurement
(``bench/pt2e_bench.py``, both on the same run, BENCHMARKS.md): both keep the answers, and ONNX
Runtime's int8 is the faster at batch 1, the line's case. Its file is also what the service
(``MAXMIN_RUNTIME=onnxruntime``) and any Open Inference Protocol server run as they are, while
PT2E's int8 graph runs fast only after ``torch.compile`` with the x86 Inductor backend: a C++
compiler on every shop-floor PC and a compile at every start, and the graph compiles only with
each ReLU moved before its pooling (Inductor's int8 max pool right after a convolution drops
``ceil_mode``).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspectlib import onnxform
from inspectlib.checkpoint import load_checkpoint, preprocess_of, read_meta, save_checkpoint
from inspectlib.decision import (
    ANSWERS_FILE,
    PRUNED_SUFFIX,
    answers_of,
    choose_operating_point,
    rates_at,
)
from inspectlib.imaging import ImageError
from inspectlib.preprocess import Preprocess
from inspectlib.stats import mcnemar
from models.slim import slim
from training.engine import TrainConfig, Training, macro_f1
from training.measure import count_params
from training.report import read_report, rerender

EXPORT_TOLERANCE = 1e-4  # largest |p_onnx - p_torch| accepted for the fp32 export
CALIBRATION_IMAGES = 256
PRUNE_EPOCHS = 5
# A fine-tune starts from trained weights: the recipe's full peak would undo much of what they
# hold before the pruned network has adapted.
FINE_TUNE_LR_FACTOR = 0.1


class CompressError(ValueError):
    """The run cannot be compressed: the message names the file or the step."""


def _split_arrays(run_dir: Path, pre: Preprocess, split: str, limit: int | None) -> tuple:
    """Decode the images of ``split`` (from the run's split.csv) as the service would."""
    split_file = run_dir / "split.csv"
    if not split_file.is_file():
        raise CompressError(f"{split_file} not found: is {run_dir} a run directory?")
    with split_file.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split") == split]
    if limit is not None and len(rows) > limit:
        # An even spread over the split (it is stored class by class), the same on every call.
        picks = np.linspace(0, len(rows) - 1, limit).round().astype(int)
        rows = [rows[i] for i in picks]
    arrays, labels = [], []
    for row in rows:
        path = Path(row["path"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CompressError(
                f"{path}: cannot read this {split} image ({exc.strerror or exc}); compress needs "
                "the images the run was trained on, at the paths in split.csv"
            ) from None
        try:
            arrays.append(pre.array(pre.image(data)))
        except ImageError as exc:
            raise CompressError(f"{path}: {exc}") from None
        labels.append(row["label"])
    if not arrays:
        raise CompressError(f"{split_file} lists no {split} images")
    shape = (0, pre.channels, pre.size, pre.size)
    return (np.stack(arrays) if arrays else np.zeros(shape, np.uint8)), labels


def _torch_probs(model: torch.nn.Module, pre: Preprocess, arrays: np.ndarray) -> np.ndarray:
    mean, std = pre.tensors("cpu")
    out = []
    with torch.inference_mode():
        for i in range(0, len(arrays), 64):
            x = (torch.from_numpy(arrays[i : i + 64]).float() / 255.0 - mean) / std
            out.append(torch.softmax(model(x).float(), dim=1).numpy())
    return np.concatenate(out)


def _timings(
    runners: dict[str, Callable[[np.ndarray], Any]], pre: Preprocess, rounds: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Latency at batch 1 and throughput at batch 32 for every runner, interleaved round by round
    so that a busy moment of the machine falls on all of them alike."""
    rng = np.random.default_rng(seed)
    one = rng.integers(0, 256, (1, pre.channels, pre.size, pre.size), dtype=np.uint8)
    many = rng.integers(0, 256, (32, pre.channels, pre.size, pre.size), dtype=np.uint8)
    for run in runners.values():  # warm up: first calls allocate and pick kernels
        for _ in range(3):
            run(one)
        run(many)
    lat: dict[str, list[float]] = {k: [] for k in runners}
    thr: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            for _ in range(10):
                t0 = time.perf_counter()
                run(one)
                lat[key].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run(many)
            thr[key].append(32 / (time.perf_counter() - t0))
    return {
        key: {
            "latency_ms_p50": float(np.percentile(lat[key], 50) * 1000),
            "latency_ms_p99": float(np.percentile(lat[key], 99) * 1000),
            "images_per_second_batch32": float(np.median(thr[key])),
        }
        for key in runners
    }


def _prune(
    run_dir: Path,
    name: str,
    model: torch.nn.Module,
    meta: dict[str, Any],
    report: dict[str, Any],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    pre: Preprocess,
    keep: float,
    epochs: int,
    threads: int,
) -> tuple[Path, dict[str, Any]]:
    """Slim ``model`` to ``keep`` of its filters, fine-tune it, and save it as a checkpoint beside
    the forms; returns the checkpoint's path and what was done."""
    small = slim(model, keep)
    kwargs = {**meta["model_kwargs"], "widths": list(small.config["widths"])}
    config = report.get("run", {}).get("config", {}).get("train", {})
    recipe = report["models"][name].get("recipe") or {}
    metric = report.get("metric", {}).get("name", "accuracy")
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=int(config.get("batch_size", TrainConfig.batch_size)),
        optimizer=recipe.get("optimizer", config.get("optimizer", TrainConfig.optimizer)),
        lr=float(recipe.get("lr", config.get("lr", TrainConfig.lr))) * FINE_TUNE_LR_FACTOR,
        weight_decay=float(config.get("weight_decay", TrainConfig.weight_decay)),
        augment=tuple(recipe.get("augment", config.get("augment", TrainConfig.augment))),
        class_weighting=config.get("class_weighting", TrainConfig.class_weighting),
        select_metric=metric,
        device="cpu",
        cuda_graphs=False,
    )
    mean, std = pre.tensors("cpu")
    y_test = data["test"][1].numpy()
    k = int(meta["model_kwargs"]["num_classes"])
    before = macro_f1(y_test, _torch_probs(small.eval(), pre, data["test"][0].numpy()).argmax(1), k)
    torch.set_num_threads(threads)
    try:
        tuned = (
            Training(
                meta["arch"],
                kwargs,
                data,
                mean,
                std,
                int(meta.get("seed", 0)),
                cfg,
                init_state=small.state_dict(),
            )
            .advance()
            .finish()
        )
    finally:
        torch.set_num_threads(1)
    if tuned.diverged:
        raise CompressError(f"{name}: the pruned network's fine-tune failed: {tuned.diverged}")
    # The smaller network answers with other confidences: its own threshold, chosen on the
    # validation split for the deployed model's target, as the trainer chose that one's.
    point = None
    deployed_point = report["models"][name].get("operating_point") or {}
    good_name = report.get("metric", {}).get("good_class")
    classes = meta["classes"]
    good = classes.index(good_name) if good_name in classes else None
    val_y = data["val"][1].numpy()
    if deployed_point.get("target") is not None and tuned.val_prob is not None:
        point = choose_operating_point(tuned.val_prob, val_y, deployed_point["target"], good)
        point["test"] = rates_at(tuned.test_prob, y_test, point["threshold"], good)
        point.pop("curve")
        answers_file = run_dir / ANSWERS_FILE
        answers = json.loads(answers_file.read_text()) if answers_file.is_file() else {}
        answers[name + PRUNED_SUFFIX] = {
            "validation": answers_of(tuned.val_prob, val_y),
            "test": answers_of(tuned.test_prob, y_test),
            "seed": int(meta.get("seed", 0)),
        }
        tmp = answers_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(answers))
        tmp.replace(answers_file)
    path = run_dir / onnxform.FOLDER / f"{name}.pruned"
    base = {k2: v for k2, v in meta.items() if not k2.startswith(("weights_", "format_"))}
    info = {
        "keep": keep,
        "widths_before": list(model.config["widths"]),
        "widths": list(small.config["widths"]),
        "importance": "batch-norm scale"
        if meta["model_kwargs"].get("norm") == "batch"
        else "L1 norm of the filter",
        "params_before": count_params(model),
        "params": count_params(small),
        "fine_tune": {
            "epochs": epochs,
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "augment": list(cfg.augment),
            "best_epoch": tuned.best_epoch,
            "seconds": round(tuned.train_seconds, 3),
            "test_macro_f1_before": before,
        },
        "operating_point": point,
    }
    save_checkpoint(
        tuned.state_dict,
        {**base, "model_kwargs": kwargs, "pruned": {**info, "from": meta["weights_sha256"]}},
        path,
    )
    return path, info


def compress_run(
    run_dir: Path,
    calibration: int = CALIBRATION_IMAGES,
    rounds: int = 20,
    progress: Callable[[str], None] = lambda _msg: None,
    prune: float | None = None,
    prune_epochs: int = PRUNE_EPOCHS,
) -> dict[str, Any]:
    """Run the study on ``run_dir``; writes the forms under ``RUN/compressed/``, the study into
    report.json and the report page, and returns the study. ``prune``: the fraction of each
    convolution's filters to keep in the pruned forms (none without it); 1 fine-tunes without
    pruning, the control for what the extra epochs alone do."""
    if prune is not None and not 0.0 < prune <= 1.0:
        raise CompressError(
            f"--prune keeps a fraction of the filters, above 0 and at most 1: {prune}"
        )
    run_dir = Path(run_dir)
    report_file = run_dir / "report.json"
    report = read_report(run_dir)
    names = [n for n, m in report.get("models", {}).items() if m.get("checkpoint")]
    if not names:
        raise CompressError(f"{report_file}: no model has a deployed checkpoint to compress")
    first = read_meta(run_dir / report["models"][names[0]]["checkpoint"])
    pre = preprocess_of(first)
    classes = first["classes"]
    progress("decoding the test and calibration images")
    test_x, test_labels = _split_arrays(run_dir, pre, "test", None)
    calib_x, _ = _split_arrays(run_dir, pre, "train", calibration)
    unknown = sorted(set(test_labels) - set(classes))
    if unknown:
        raise CompressError(f"split.csv names classes the models do not know: {unknown}")
    y = np.array([classes.index(c) for c in test_labels])
    k = len(classes)
    data = None
    if prune is not None:
        progress("decoding the training and validation images for the fine-tune")
        data = {"test": (torch.from_numpy(test_x), torch.from_numpy(y))}
        for split in ("train", "val"):
            xs, labels = _split_arrays(run_dir, pre, split, None)
            unknown = sorted(set(labels) - set(classes))
            if unknown:
                raise CompressError(f"split.csv names classes the models do not know: {unknown}")
            data[split] = (
                torch.from_numpy(xs).contiguous(memory_format=torch.channels_last),
                torch.tensor([classes.index(c) for c in labels]),
            )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pruned_forms = ["pruned-fp32", "pruned-int8"] if prune is not None else []
    study: dict[str, Any] = {
        "forms": ["torch-fp32", "onnx-fp32", "onnx-int8", *pruned_forms],
        "test_images": len(y),
        "calibration_images": len(calib_x),
        "threads": 1,
        "pruning": None
        if prune is None
        else {"keep": prune, "epochs": prune_epochs, "lr_factor": FINE_TUNE_LR_FACTOR},
        "export_tolerance": EXPORT_TOLERANCE,
        "models": {},
    }
    runners: dict[str, Callable[[np.ndarray], Any]] = {}
    for name in names:
        checkpoint = run_dir / report["models"][name]["checkpoint"]
        model, meta = load_checkpoint(checkpoint)
        mean, std = pre.tensors("cpu")
        progress(f"{name}: exporting to ONNX")
        fp32_path = onnxform.form_path(run_dir, name, "fp32")
        fp32_meta = onnxform.export_fp32(checkpoint, fp32_path)
        progress(f"{name}: quantizing to int8 on {len(calib_x)} training images")
        int8_path = onnxform.form_path(run_dir, name, "int8")
        int8_meta = onnxform.quantize_int8(fp32_path, int8_path, calib_x)
        files = {"onnx-fp32": fp32_path, "onnx-int8": int8_path}
        sizes = {
            "torch-fp32": int(meta["weights_bytes"]),
            "onnx-fp32": int(fp32_meta["bytes"]),
            "onnx-int8": int(int8_meta["bytes"]),
        }
        pruning = None
        if prune is not None:
            progress(f"{name}: pruning to {prune:.0%} of the filters, fine-tuning")
            pruned, pruning = _prune(
                run_dir, name, model, meta, report, data, pre, prune, prune_epochs, threads
            )
            files["pruned-fp32"] = onnxform.form_path(run_dir, name, "pruned-fp32")
            files["pruned-int8"] = onnxform.form_path(run_dir, name, "pruned-int8")
            exported = onnxform.export_fp32(
                pruned, files["pruned-fp32"], "pruned-fp32", derived_from=meta["weights_sha256"]
            )
            quantized = onnxform.quantize_int8(
                files["pruned-fp32"], files["pruned-int8"], calib_x, form="pruned-int8"
            )
            sizes["pruned-fp32"], sizes["pruned-int8"] = exported["bytes"], quantized["bytes"]
        sessions = {form: onnxform.session(path) for form, path in files.items()}
        probs = {"torch-fp32": _torch_probs(model, pre, test_x)}
        for form, sess in sessions.items():
            probs[form] = np.concatenate(
                [onnxform.run(sess, test_x[i : i + 64]) for i in range(0, len(test_x), 64)]
            )
        gap = float(np.abs(probs["onnx-fp32"] - probs["torch-fp32"]).max())
        same = float(np.mean(probs["onnx-fp32"].argmax(1) == probs["torch-fp32"].argmax(1)))
        if gap > EXPORT_TOLERANCE or same < 1.0:
            raise CompressError(
                f"{name}: the ONNX export answers differently from PyTorch (largest probability "
                f"difference {gap:.2e}, {same * 100:.1f}% same answers); not kept"
            )
        ref_correct = probs["torch-fp32"].argmax(1) == y
        ref_acc = float(ref_correct.mean())
        ref_f1 = macro_f1(y, probs["torch-fp32"].argmax(1), k)
        forms: dict[str, Any] = {}
        for form, p in probs.items():
            pred = p.argmax(1)
            acc = float(np.mean(pred == y))
            f1 = macro_f1(y, pred, k)
            forms[form] = {
                "accuracy": acc,
                "macro_f1": f1,
                "accuracy_change": acc - ref_acc,
                "macro_f1_change": f1 - ref_f1,
                "same_answers_as_fp32": float(np.mean(pred == probs["torch-fp32"].argmax(1))),
                "mcnemar_vs_fp32": mcnemar(pred == y, ref_correct),
                "weights_bytes": sizes[form],
                "file": None
                if form == "torch-fp32"
                else Path(files[form]).relative_to(run_dir).as_posix(),
            }
        forms["onnx-fp32"]["largest_probability_difference"] = gap
        study["models"][name] = {"forms": forms}
        if pruning is not None:
            study["models"][name]["pruning"] = pruning

        def torch_run(a: np.ndarray, model=model, mean=mean, std=std) -> Any:
            with torch.inference_mode():
                return model((torch.from_numpy(a).float() / 255.0 - mean) / std)

        runners[f"{name}/torch-fp32"] = torch_run
        for form, sess in sessions.items():
            runners[f"{name}/{form}"] = lambda a, sess=sess: onnxform.run(sess, a)
    progress(f"timing {len(runners)} model forms, {rounds} rounds")
    timing = _timings(runners, pre, rounds)
    for key, t in timing.items():
        name, form = key.split("/")
        study["models"][name]["forms"][form].update(t)
    study["verdict"] = compression_verdict(study)
    report["compression"] = study
    report_file.write_text(json.dumps(report, indent=2))
    (run_dir / onnxform.FOLDER / "compression.json").write_text(json.dumps(study, indent=2))
    rerender(run_dir)
    return study


def compression_verdict(study: dict[str, Any]) -> str:
    """One sentence a manager can act on: MaxMin's cost against the baseline after int8, and
    what int8 did to each model's answers."""
    models = study["models"]
    parts = []
    for name, m in models.items():
        f = m["forms"]["onnx-int8"]
        p = f["mcnemar_vs_fp32"]["p_value"]
        changed = "changed" if p < 0.05 else "did not reliably change"
        parts.append(
            f"{name} {f['macro_f1_change'] * 100:+.1f} macro F1 points (McNemar p = {p:.2f}: "
            f"{changed})"
        )
    text = "In int8, against fp32: " + "; ".join(parts) + "."
    base = models.get("baseline", {}).get("forms", {}).get("onnx-int8")
    mm = models.get("maxmin", {}).get("forms", {}).get("onnx-int8")
    if base and mm:
        torch_ratio = (
            models["maxmin"]["forms"]["torch-fp32"]["latency_ms_p50"]
            / models["baseline"]["forms"]["torch-fp32"]["latency_ms_p50"]
        )
        text += (
            f" Compressed, MaxMin costs {mm['weights_bytes'] / base['weights_bytes']:.1f}x the "
            f"baseline's weights bytes and {mm['latency_ms_p50'] / base['latency_ms_p50']:.1f}x "
            f"its latency at batch 1 (in fp32 PyTorch: {torch_ratio:.1f}x)."
        )
    if study.get("pruning"):
        keep = study["pruning"]["keep"]
        parts = []
        for name, m in models.items():
            f = m["forms"]["pruned-int8"]
            p = f["mcnemar_vs_fp32"]["p_value"]
            parts.append(
                f"{name} {f['macro_f1_change'] * 100:+.1f} macro F1 points (McNemar p = {p:.2f}), "
                f"{m['forms']['torch-fp32']['weights_bytes'] / f['weights_bytes']:.1f}x smaller"
            )
        text += (
            f" Pruned to {keep:.0%} of the filters, fine-tuned and in int8, against fp32: "
            + "; ".join(parts)
            + "."
        )
        base = models.get("baseline", {}).get("forms", {}).get("pruned-int8")
        mm = models.get("maxmin", {}).get("forms", {}).get("pruned-int8")
        if base and mm:
            text += (
                f" Pruned, MaxMin costs {mm['weights_bytes'] / base['weights_bytes']:.1f}x the "
                f"baseline's bytes and {mm['latency_ms_p50'] / base['latency_ms_p50']:.1f}x its "
                "latency."
            )
    return text
