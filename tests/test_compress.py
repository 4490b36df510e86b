"""The compression study and the compressed forms served: real ONNX exports, real int8
quantization, the real service on both databases."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from markupsafe import escape
from pydantic import ValidationError

from app.core.config import Settings
from app.core.inference import Classifier, ModelsUnavailable
from inspectlib import onnxform
from tests.helpers import png_bytes

NAMES = ["baseline", "maxmin"]


def test_study_in_the_report(compressed_run: Path) -> None:
    report = json.loads((compressed_run / "report.json").read_text())
    study = report["compression"]
    assert set(study["models"]) == set(NAMES)
    assert study["test_images"] > 0 and study["calibration_images"] > 0
    for name, m in study["models"].items():
        forms = m["forms"]
        assert set(forms) == {"torch-fp32", "onnx-fp32", "onnx-int8"}
        # The export answers as PyTorch does; int8 is a real quantization, a third the bytes.
        assert forms["onnx-fp32"]["largest_probability_difference"] <= 1e-4
        assert forms["onnx-fp32"]["same_answers_as_fp32"] == 1.0
        assert forms["onnx-int8"]["weights_bytes"] * 2.5 < forms["onnx-fp32"]["weights_bytes"]
        for f in forms.values():
            assert 0 <= f["accuracy"] <= 1 and f["latency_ms_p99"] >= f["latency_ms_p50"] > 0
            assert f["images_per_second_batch32"] > 0
            assert 0 <= f["mcnemar_vs_fp32"]["p_value"] <= 1
        fp32_acc = forms["torch-fp32"]["accuracy"]
        assert forms["onnx-int8"]["accuracy_change"] == pytest.approx(
            forms["onnx-int8"]["accuracy"] - fp32_acc
        )
        graph = onnx.load(compressed_run / forms["onnx-int8"]["file"]).graph
        ops = {n.op_type for n in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert "MaxMin costs" in study["verdict"]
    html = (compressed_run / "report.html").read_text()
    assert "Compression study" in html and str(escape(study["verdict"])) in html


def test_onnx_forms_answer_as_the_checkpoints(compressed_run: Path) -> None:
    """The service's ONNX runtime takes the same uint8 arrays and gives PyTorch's answers."""
    rng = np.random.default_rng(0)
    torch_side = Classifier(compressed_run, NAMES, "cpu")
    p = torch_side.preprocess
    arrays = rng.integers(0, 256, (6, p.channels, p.size, p.size), dtype=np.uint8)
    expected = torch_side.classify(arrays)
    fp32 = Classifier(compressed_run, NAMES, "cpu", runtime="onnxruntime", form="fp32")
    int8 = Classifier(compressed_run, NAMES, "cpu", runtime="onnxruntime", form="int8")
    got, got8 = fp32.classify(arrays), int8.classify(arrays)
    for name in NAMES:
        np.testing.assert_allclose(got[name][0], expected[name][0], atol=1e-4)
        assert np.allclose(got8[name][0].sum(1), 1, atol=1e-4)
        assert fp32.models[name].version.startswith(f"{name}.fp32.onnx:")
        assert int8.models[name].version.startswith(f"{name}.int8.onnx:")
    assert fp32.models["maxmin"].version != int8.models["maxmin"].version


def test_altered_or_missing_form_is_refused(compressed_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(compressed_run, run)
    target = onnxform.form_path(run, "maxmin", "int8")
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(ModelsUnavailable, match="altered or replaced"):
        Classifier(run, NAMES, "cpu", runtime="onnxruntime", form="int8")
    target.unlink()
    with pytest.raises(ModelsUnavailable, match="maxmin-inspect compress"):
        Classifier(run, NAMES, "cpu", runtime="onnxruntime", form="int8")


def test_int8_needs_onnxruntime() -> None:
    with pytest.raises(ValidationError, match="MAXMIN_RUNTIME=onnxruntime"):
        Settings(runtime="torch", model_form="int8")


@pytest.mark.parametrize("model_process", [True, False])
@pytest.mark.parametrize("form", ["int8", "pruned-int8"])
def test_service_serves_a_compressed_form(
    request: pytest.FixtureRequest, service_client, model_process: bool, form: str
) -> None:
    """MAXMIN_MODEL_FORM=int8, or pruned-int8 (after ``compress --prune``): the answers come from
    that file, and the dashboard names the form."""
    run = request.getfixturevalue("compressed_run" if form == "int8" else "pruned_run")
    with service_client(
        run, runtime="onnxruntime", model_form=form, model_process=model_process
    ) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ok" and ready["form"] == f"onnxruntime {form}"
        r = client.post("/predict", content=png_bytes(3), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        results = r.json()["data"][0]["results"]
        for name in NAMES:
            assert results[name]["model_version"].startswith(f"{name}.{form}.onnx:")
            assert abs(sum(results[name]["probabilities"].values()) - 1) < 1e-3
        page = client.get("/dashboard")
        assert page.status_code == 200 and f"onnxruntime {form}" in page.text
        # What the run's study found for this form, per model, beside it.
        study = json.loads((run / "report.json").read_text())["compression"]
        shown = page.text.split('id="form-study">', 1)[1].split("</span>", 1)[0]
        assert f"({study['test_images']} test images)" in shown
        for name in NAMES:
            found = study["models"][name]["forms"][f"onnx-{form}" if form == "int8" else form]
            assert (
                f"{name} {found['macro_f1_change'] * 100:+.1f} points of macro F1 "
                f"(McNemar p = {found['mcnemar_vs_fp32']['p_value']:.2f})"
            ) in shown


def test_a_form_the_study_found_worse_is_flagged(
    compressed_run: Path, tmp_path: Path, service_client
) -> None:
    """A form that lost answers against fp32 in the study (a drop with McNemar p < 0.05) is still
    served, as chosen, but the dashboard says so; a loss the test cannot call reliable, or fp32
    PyTorch itself, carries no flag."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(compressed_run, run)
    report = json.loads((run / "report.json").read_text())
    worse = report["compression"]["models"]["maxmin"]["forms"]["onnx-int8"]
    worse["macro_f1_change"], worse["mcnemar_vs_fp32"]["p_value"] = -0.08, 0.01
    unsure = report["compression"]["models"]["baseline"]["forms"]["onnx-int8"]
    unsure["macro_f1_change"], unsure["mcnemar_vs_fp32"]["p_value"] = -0.08, 0.2
    (run / "report.json").write_text(json.dumps(report))
    served = Classifier(run, NAMES, "cpu", runtime="onnxruntime", form="int8")
    assert served.form_study["models"]["maxmin"]["worse"]
    assert not served.form_study["models"]["baseline"]["worse"]
    assert Classifier(run, NAMES, "cpu").form_study is None  # fp32 PyTorch: the reference
    with service_client(run, runtime="onnxruntime", model_form="int8") as client:
        page = client.get("/dashboard").text
        assert "maxmin -8.0 points of macro F1 (McNemar p = 0.01)" in page
        assert "answered reliably worse than fp32" in page
    report["compression"]["models"]["maxmin"]["forms"]["onnx-int8"]["mcnemar_vs_fp32"][
        "p_value"
    ] = 0.2
    (run / "report.json").write_text(json.dumps(report))
    with service_client(run, runtime="onnxruntime", model_form="int8") as client:
        assert "answered reliably worse" not in client.get("/dashboard").text
    del report["compression"]["models"]["maxmin"]["forms"]["onnx-int8"]["mcnemar_vs_fp32"]
    (run / "report.json").write_text(json.dumps(report))  # a study without it: served, no line
    assert Classifier(run, NAMES, "cpu", runtime="onnxruntime", form="int8").form_study is None


def test_service_without_forms_says_what_to_run(trained_run: Path, service_client) -> None:
    with service_client(trained_run, runtime="onnxruntime", model_form="int8") as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "maxmin-inspect compress" in r.json()["detail"]
        r = client.post("/predict", content=png_bytes(3), headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and "compress" in r.text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maxmin_inspect", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compress_cli_names_the_problem(tmp_path: Path, trained_run: Path) -> None:
    r = _cli("compress", str(tmp_path))
    assert r.returncode == 2 and "report.json" in r.stderr and "Traceback" not in r.stderr
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    rows = (run / "split.csv").read_text().splitlines()
    missing = next(line for line in rows[1:] if line.endswith(",test")).split(",")[0]
    Path(missing).rename(missing + ".moved")
    try:
        r = _cli("compress", str(run))
    finally:
        Path(missing + ".moved").rename(missing)
    assert r.returncode == 2 and missing in r.stderr and "Traceback" not in r.stderr
    assert not (run / "compressed" / "compression.json").exists()


@pytest.mark.parametrize("form", ["fp32", "int8"])
def test_triton_repository_fits_the_models(compressed_run: Path, tmp_path: Path, form: str) -> None:
    """Triton cannot run here: the repository's config is parsed with Triton's own protobuf
    message and checked against the ONNX graph it serves."""
    from training.triton import read_config

    out = tmp_path / "triton"
    r = _cli("export", str(compressed_run), "--triton", str(out), "--form", form)
    assert r.returncode == 0, r.stderr
    report = json.loads((compressed_run / "report.json").read_text())
    for name in NAMES:
        config = read_config(out / name / "config.pbtxt")
        model = onnx.load(out / name / "1" / "model.onnx")
        onnx.checker.check_model(model)
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size > 0 and config.dynamic_batching.max_queue_delay_microseconds
        (graph_in,) = model.graph.input
        (graph_out,) = model.graph.output
        (cfg_in,) = config.input
        (cfg_out,) = config.output
        assert (cfg_in.name, cfg_out.name) == (graph_in.name, graph_out.name)
        in_dims = [d.dim_value or d.dim_param for d in graph_in.type.tensor_type.shape.dim]
        out_dims = [d.dim_value or d.dim_param for d in graph_out.type.tensor_type.shape.dim]
        # Triton's dims leave out the batch dimension, which the graph keeps dynamic.
        assert isinstance(in_dims[0], str) and list(cfg_in.dims) == in_dims[1:]
        assert isinstance(out_dims[0], str) and list(cfg_out.dims) == out_dims[1:]
        assert graph_in.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert cfg_in.data_type == 2  # TYPE_UINT8
        assert cfg_out.data_type == 11  # TYPE_FP32
        labels = (out / name / cfg_out.label_filename).read_text().split()
        assert labels == report["dataset"]["classes"]
        pre = json.loads(config.parameters["preprocess"].string_value)
        assert [pre["channels"], pre["size"], pre["size"]] == list(cfg_in.dims)
        assert config.parameters["form"].string_value == form


def test_triton_export_without_forms(trained_run: Path, tmp_path: Path) -> None:
    r = _cli("export", str(trained_run), "--triton", str(tmp_path / "t"))
    assert r.returncode == 2 and "maxmin-inspect compress" in r.stderr


@pytest.fixture(scope="module")
def pruned_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained run, compressed from the command line with --prune."""
    run = tmp_path_factory.mktemp("pruned") / "run"
    shutil.copytree(trained_run, run)
    r = _cli("compress", str(run), "--rounds", "1", "--prune", "0.5", "--prune-epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "pruned-int8" in r.stdout
    return run


def test_pruned_forms_in_the_study(pruned_run: Path, trained_run: Path) -> None:
    """With --prune: each model slimmed to half its filters, fine-tuned, exported and quantized;
    the pruned network loads from its own checkpoint and its ONNX form answers as it does."""
    import torch

    from inspectlib.checkpoint import load_checkpoint
    from training.compress import compress_run

    run = pruned_run
    study = json.loads((run / "report.json").read_text())["compression"]
    assert study["forms"][-2:] == ["pruned-fp32", "pruned-int8"]
    assert study["pruning"]["keep"] == 0.5
    for name in NAMES:
        m = study["models"][name]
        forms, pruning = m["forms"], m["pruning"]
        assert pruning["widths"] == [w // 2 for w in pruning["widths_before"]]
        assert pruning["params"] < 0.5 * pruning["params_before"]
        assert 1 <= pruning["fine_tune"]["best_epoch"] <= 2
        assert forms["pruned-fp32"]["weights_bytes"] < 0.6 * forms["onnx-fp32"]["weights_bytes"]
        assert forms["pruned-int8"]["weights_bytes"] < forms["pruned-fp32"]["weights_bytes"]
        model, meta = load_checkpoint(run / "compressed" / f"{name}.pruned")
        assert meta["model_kwargs"]["widths"] == pruning["widths"]
        assert meta["pruned"]["from"] == read_meta_sha(trained_run, name)
        sess = onnxform.session(run / forms["pruned-fp32"]["file"])
        x = np.random.default_rng(0).integers(0, 256, (4, 1, 24, 24), dtype=np.uint8)
        mean = torch.tensor(meta["preprocess"]["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(meta["preprocess"]["std"]).view(1, -1, 1, 1)
        with torch.no_grad():
            want = torch.softmax(model((torch.from_numpy(x).float() / 255 - mean) / std), 1)
        np.testing.assert_allclose(onnxform.run(sess, x), want.numpy(), atol=1e-4)
        point = pruning["operating_point"]
        assert 0 <= point["threshold"] <= 1.01 and point["target"] is not None
    assert "Pruned to 50% of the filters" in study["verdict"]
    html = (run / "report.html").read_text()
    assert "pruned-int8" in html and 'id="pruning"' in html and "32/32/64 → 16/16/32" in html
    with pytest.raises(ValueError, match="above 0 and at most 1"):
        compress_run(run, prune=1.5)


def test_the_pruned_form_decides_with_its_own_thresholds(pruned_run: Path) -> None:
    """The pruned network's thresholds, chosen on validation for it, not the deployed model's."""
    study = json.loads((pruned_run / "report.json").read_text())["compression"]
    served = Classifier(pruned_run, NAMES, "cpu", runtime="onnxruntime", form="pruned-int8")
    assert served.thresholds == {
        n: study["models"][n]["pruning"]["operating_point"]["threshold"] for n in NAMES
    }


def test_a_new_target_reaches_the_pruned_thresholds(pruned_run: Path, tmp_path: Path) -> None:
    from inspectlib.decision import retarget_run

    run = tmp_path / "run"
    shutil.copytree(pruned_run, run)
    served = Classifier(run, NAMES, "cpu", runtime="onnxruntime", form="pruned-fp32")
    answers = json.loads((run / "operating-answers.json").read_text())
    points = retarget_run(run, 0.0, "test")
    assert {"baseline.pruned", "maxmin.pruned"} <= set(points)
    study = json.loads((run / "report.json").read_text())["compression"]
    for name in NAMES:
        point = study["models"][name]["pruning"]["operating_point"]
        assert point["target"] == 0.0 and point["set_by"] == "test"
        # at a zero error target, no wrongly answered validation part may be accepted
        val = answers[f"{name}.pruned"]["validation"]
        wrong = [
            c
            for c, p, t in zip(val["confidence"], val["predicted"], val["truth"], strict=True)
            if p != t
        ]
        assert all(c < point["threshold"] for c in wrong)
    assert served.refresh_thresholds()
    assert served.thresholds == {
        n: study["models"][n]["pruning"]["operating_point"]["threshold"] for n in NAMES
    }


def test_pruned_form_without_its_study_is_refused(pruned_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(pruned_run, run)
    report = json.loads((run / "report.json").read_text())
    report["compression"]["models"]["maxmin"].pop("pruning")
    (run / "report.json").write_text(json.dumps(report))
    with pytest.raises(ModelsUnavailable, match="--prune"):
        Classifier(run, NAMES, "cpu", runtime="onnxruntime", form="pruned-int8")


def read_meta_sha(run: Path, name: str) -> str:
    report = json.loads((run / "report.json").read_text())
    meta = json.loads((run / (report["models"][name]["checkpoint"] + ".json")).read_text())
    return meta["weights_sha256"]
