"""A Triton Inference Server model repository from a run's ONNX forms.

``maxmin-inspect export RUN_DIR --triton OUT`` writes, per deployed model::

    OUT/<model>/config.pbtxt      platform onnxruntime_onnx, dynamic batching, the I/O below
    OUT/<model>/labels.txt        the class names, one per line, in output order
    OUT/<model>/1/model.onnx      the run's fp32 or int8 form (inspectlib.onnxform)

The graph takes uint8 images (N x C x S x S, the checkpoint's preprocessing: resize and channels
done by the client, normalization inside the graph) and answers class probabilities, so the
service's ``MAXMIN_INFERENCE_URL`` can send its own arrays as they are. The configuration is built
with Triton's own protobuf message (``tritonclient``), never as hand-written text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from inspectlib import onnxform
from inspectlib.checkpoint import read_meta
from training.report import read_report

MAX_BATCH = 64
PREFERRED_BATCHES = (8, 32)
QUEUE_DELAY_US = 2000  # how long a request may wait for others to fill a batch


class ExportError(ValueError):
    """The repository cannot be written: the message names the file or what to run."""


def _model_config_pb2():  # noqa: ANN202
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ExportError(
            "writing a Triton repository needs tritonclient: pip install 'maxmin-inspect[scale]'"
        ) from None
    return model_config_pb2


def model_config(name: str, form_meta: dict[str, Any]) -> Any:
    """Triton's ModelConfig message for one exported form."""
    mc = _model_config_pb2()
    pre = form_meta["preprocess"]
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH)
    config.input.add(
        name=onnxform.INPUT_NAME,
        data_type=mc.TYPE_UINT8,
        format=mc.ModelInput.FORMAT_NCHW,
        dims=[pre["channels"], pre["size"], pre["size"]],
    )
    config.output.add(
        name=onnxform.OUTPUT_NAME,
        data_type=mc.TYPE_FP32,
        dims=[len(form_meta["classes"])],
        label_filename="labels.txt",
    )
    config.dynamic_batching.preferred_batch_size.extend(PREFERRED_BATCHES)
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    # What the client must do before sending, for a reader of the repository.
    for key, value in {
        "preprocess": json.dumps(pre, sort_keys=True),
        "form": form_meta["form"],
        "source_weights_sha256": form_meta["source_weights_sha256"],
    }.items():
        config.parameters[key].string_value = value
    return config


def write_repository(run_dir: Path, out: Path, form: str = "fp32") -> dict[str, Path]:
    """Write the repository for every deployed model of ``run_dir``; returns model -> folder."""
    from google.protobuf import text_format

    run_dir, out = Path(run_dir), Path(out)
    report_file = run_dir / "report.json"
    report = read_report(run_dir)
    written: dict[str, Path] = {}
    for name, m in report.get("models", {}).items():
        if not m.get("checkpoint"):
            continue
        checkpoint = run_dir / m["checkpoint"]
        read_meta(checkpoint)
        source = onnxform.form_path(run_dir, name, form)
        try:
            meta = onnxform.read_form(source, checkpoint)
        except onnxform.FormError as exc:
            raise ExportError(str(exc)) from None
        folder = out / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / "1" / "model.onnx")
        (folder / "labels.txt").write_text("".join(f"{c}\n" for c in meta["classes"]))
        config = model_config(name, meta)
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
        written[name] = folder
    if not written:
        raise ExportError(f"{report_file}: no model has a deployed checkpoint to export")
    return written


def read_config(path: Path) -> Any:
    """Parse a config.pbtxt into Triton's ModelConfig message (raises on a malformed file)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), _model_config_pb2().ModelConfig())
