"""One preprocessing, written into each checkpoint: the service feeds a model exactly the tensor
the trainer fed it for the same file, and refuses a checkpoint whose preprocessing it cannot
reproduce. The web process reads the specification without loading weights."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.core.inference import Classifier, ServedRun
from inspectlib.checkpoint import CheckpointError, load_checkpoint, read_meta
from inspectlib.preprocess import PREPROCESS_VERSION, Preprocess, PreprocessError, normalize
from maxmin_inspect.main import main
from training.data import load_dataset


def _odd_images(root: Path) -> list[Path]:
    """Two classes of images in the shapes a line meets: large JPEG (decoded in draft mode),
    16-bit PNG, RGBA PNG, EXIF-rotated JPEG, palette BMP, TIFF, odd aspect ratios."""
    rng = np.random.default_rng(3)
    paths = []
    for k, cls in enumerate(("good", "bad")):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            # The classes differ in brightness, learnable in a few steps.
            base = rng.normal(60 + 130 * k, 20, (90 + 7 * i, 140 - 5 * i, 3))
            base = base.clip(0, 255).astype(np.uint8)
            if k == 0:
                base[..., 1:] = base[..., :1]  # colour files holding grey pixels
            img = Image.fromarray(base)
            kind = i % 6
            path = root / cls / f"{cls}{i}"
            if kind == 0:
                img.resize((900, 640)).save(path := path.with_suffix(".jpg"), quality=90)
            elif kind == 1:
                grey = (rng.random((70, 50)) * 60000).astype(np.uint16)
                Image.fromarray(grey).save(path := path.with_suffix(".png"))
            elif kind == 2:
                img.convert("RGBA").save(path := path.with_suffix(".png"))
            elif kind == 3:
                exif = Image.Exif()
                exif[0x0112] = 6  # rotated 90 degrees
                img.save(path := path.with_suffix(".jpg"), exif=exif)
            elif kind == 4:
                img.convert("P").save(path := path.with_suffix(".bmp"))
            else:
                img.save(path := path.with_suffix(".tif"))
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pre")
    _odd_images(root / "parts")
    out = root / "run"
    argv = ["train", str(root / "parts"), "--out", str(out), "--models", "baseline,maxmin"]
    argv += ["--size", "20", "--epochs", "4", "--seeds", "1", "--batch-size", "4", "--quiet"]
    argv += ["--no-search", "--no-register", "--latency-seconds", "0.05", "--no-cache"]
    argv += ["--val-fraction", "0.25", "--test-fraction", "0.25"]
    assert main(argv) == 0
    return root / "parts", out


def test_the_service_feeds_the_models_what_the_trainer_fed_them(trained) -> None:  # noqa: ANN001
    parts, run_dir = trained
    served = ServedRun(run_dir, ["baseline", "maxmin"])
    pre = served.preprocess
    ds = load_dataset(
        parts, pre.size, str(pre.channels), val_fraction=0.25, test_fraction=0.25, progress=False
    )
    assert pre == ds.preprocess  # the checkpoint's statistics are the training set's
    t_mean, t_std = ds.preprocess.tensors()
    s_mean, s_std = pre.tensors()
    assert len(ds.paths) == 24
    for i, path in enumerate(ds.paths):
        upload = served.decode(Path(path).read_bytes(), max_pixels=10**7).array
        trainer = ds.images[i].numpy()
        assert np.array_equal(upload, trainer), path
        x_train = normalize(ds.images[i : i + 1], t_mean, t_std)
        x_serve = normalize(torch.from_numpy(upload[None]), s_mean, s_std)
        assert torch.equal(x_train, x_serve), path


def test_the_web_side_reads_no_weights(trained, tmp_path: Path) -> None:  # noqa: ANN001
    _, run_dir = trained
    report = json.loads((run_dir / "report.json").read_text())
    weights = run_dir / Path(report["models"]["maxmin"]["checkpoint"]).with_suffix(".safetensors")
    saved = weights.read_bytes()
    weights.write_bytes(b"not weights")  # ServedRun never opens it; the model side refuses it
    try:
        served = ServedRun(run_dir, ["baseline", "maxmin"])
        assert served.classes == ["bad", "good"] and served.models["maxmin"].version
        with pytest.raises(CheckpointError, match="do not match the sha256"):
            Classifier(run_dir, ["baseline", "maxmin"], "cpu")
    finally:
        weights.write_bytes(saved)
    probs = Classifier(run_dir, ["baseline", "maxmin"], "cpu").classify(
        np.stack([served.decode(_png(), 10**7).array] * 2)
    )
    assert probs["maxmin"][0].shape == (2, 2)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (33, 17), 120).save(buf, format="PNG")
    return buf.getvalue()


def test_the_specification_is_written_once_and_versioned(trained) -> None:  # noqa: ANN001
    _, run_dir = trained
    ckpt = next((run_dir / "checkpoints").glob("baseline-*.json"))
    meta = json.loads(ckpt.read_text())
    assert meta["preprocess"]["version"] == PREPROCESS_VERSION
    assert meta["preprocess"]["resize"] == "bilinear-squash"
    assert not {"image_size", "channels", "normalization", "resize"} & set(meta)
    model, _ = load_checkpoint(ckpt.with_suffix(""))
    assert model(torch.zeros(1, meta["preprocess"]["channels"], 20, 20)).shape == (1, 2)


def test_a_checkpoint_from_another_preprocessing_is_refused(trained, tmp_path: Path) -> None:  # noqa: ANN001
    _, run_dir = trained
    ckpt = next((run_dir / "checkpoints").glob("baseline-*.json"))
    meta = json.loads(ckpt.read_text())
    for change, message in (
        ({"version": PREPROCESS_VERSION + 1}, "train the run again"),
        ({"resize": "center-crop"}, "unknown resize"),
        ({"size": 32}, "the model's input and the preprocessing disagree"),
        ({"mean": [0.5, 0.5]}, "one value per channel"),
    ):
        bad = tmp_path / f"bad-{len(message)}.json"
        bad.write_text(json.dumps({**meta, "preprocess": {**meta["preprocess"], **change}}))
        with pytest.raises(CheckpointError, match=message):
            read_meta(bad.with_suffix(""))


def test_checkpoints_from_before_the_specification_still_load(trained, tmp_path: Path) -> None:  # noqa: ANN001
    _, run_dir = trained
    ckpt = next((run_dir / "checkpoints").glob("baseline-*.json"))
    meta = json.loads(ckpt.read_text())
    pre = meta.pop("preprocess")
    meta |= {
        "image_size": pre["size"],
        "channels": pre["channels"],
        "normalization": {"mean": pre["mean"], "std": pre["std"]},
    }
    old = tmp_path / "old.json"
    old.write_text(json.dumps(meta))
    assert Preprocess.from_dict(
        read_meta(old.with_suffix(""))["preprocess"]
    ) == Preprocess.from_dict(pre)


def test_the_specification_checks_itself() -> None:
    with pytest.raises(PreprocessError, match="channels must be 1 or 3"):
        Preprocess(20, 2, (0.1, 0.1), (1.0, 1.0))
    with pytest.raises(PreprocessError, match="incomplete"):
        Preprocess.from_dict({"size": 20})
