"""Loading real-world image folders: skipped files, class errors, duplicates, splits, cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectlib.datasets import DataError
from tests.helpers import write_folder
from training.data import load_dataset


def _skipped(ds) -> dict[str, str]:  # noqa: ANN001
    return {Path(s["path"]).name: s["reason"] for s in ds.skipped}


def test_unreadable_files_are_skipped_with_reasons(small_folder: Path) -> None:
    good = small_folder / "good"
    (good / "truncated.png").write_bytes((good / "good_0.png").read_bytes()[:60])
    (good / "fake.jpg").write_bytes(b"this is not a jpeg")
    (good / "empty.png").write_bytes(b"")
    (good / "notes.txt").write_text("inspection notes")
    gif = Image.open(good / "good_2.png")
    gif.save(good / "animated.tiff.gif", format="GIF")
    gif.save(good / "renamed.png", format="GIF")  # a GIF under a .png name is still a GIF
    (small_folder / "stray.png").write_bytes((good / "good_1.png").read_bytes())
    ds = load_dataset(small_folder, size=24, progress=False)
    reasons = _skipped(ds)
    assert "truncated" in reasons["truncated.png"] or "corrupt" in reasons["truncated.png"]
    assert reasons["fake.jpg"] == "not a recognised image format"
    assert reasons["empty.png"] == "empty file"
    assert reasons["notes.txt"] == "not an image file type"
    assert reasons["animated.tiff.gif"] == "not an image file type"
    assert reasons["renamed.png"].startswith("GIF images are not accepted")
    assert reasons["stray.png"] == "not inside a class folder"
    assert len(ds.labels) == 30  # every good image survives


def test_one_class_is_an_error(tmp_path: Path) -> None:
    write_folder(tmp_path, {"good": 6})
    with pytest.raises(DataError, match="only one class \\('good'\\)"):
        load_dataset(tmp_path, size=16, progress=False)


def test_empty_class_is_named(small_folder: Path) -> None:
    (small_folder / "crack").mkdir()
    with pytest.raises(DataError, match="class folder 'crack'"):
        load_dataset(small_folder, size=16, progress=False)


def test_class_of_only_broken_files_is_named(small_folder: Path) -> None:
    (small_folder / "crack").mkdir()
    (small_folder / "crack" / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="class 'crack' has no usable images"):
        load_dataset(small_folder, size=16, progress=False)


def test_too_few_images_for_the_split_is_named(small_folder: Path) -> None:
    write_folder(small_folder, {"rare": 2}, seed=5)
    with pytest.raises(DataError, match="class 'rare' has 2 usable image"):
        load_dataset(small_folder, size=16, progress=False)


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere does not exist"):
        load_dataset(tmp_path / "nowhere", size=16, progress=False)


def test_duplicates_are_removed_and_never_straddle_splits(small_folder: Path) -> None:
    for i in range(5):
        shutil.copy(
            small_folder / "good" / f"good_{i}.png", small_folder / "good" / f"copy_{i}.png"
        )
    # The same bytes under two labels cannot be trusted: both copies are skipped.
    shutil.copy(small_folder / "dent" / "dent_0.png", small_folder / "scratch" / "clash.png")
    ds = load_dataset(small_folder, size=16, progress=False)
    assert ds.duplicates["removed"] == 5
    reasons = _skipped(ds)
    assert "dent and scratch" in reasons["clash.png"]
    assert "dent and scratch" in reasons["dent_0.png"]
    flat = ds.images.reshape(len(ds.images), -1).numpy()
    assert len({row.tobytes() for row in flat}) == len(flat)


def test_split_is_stratified_seeded_and_complete(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 40, "b": 20, "c": 10})
    one = load_dataset(tmp_path, size=16, progress=False)
    two = load_dataset(tmp_path, size=16, progress=False)
    assert np.array_equal(one.split, two.split)
    counts = one.counts()
    for cls in ("a", "b", "c"):
        assert all(counts[s][cls] >= 1 for s in ("train", "val", "test"))
    assert counts["test"]["a"] == 6 and counts["test"]["c"] == 2
    other = load_dataset(tmp_path, size=16, split_seed=1, progress=False)
    assert not np.array_equal(one.split, other.split)


def test_train_and_test_folders_are_respected(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", {"ok": 10, "bad": 10})
    write_folder(tmp_path / "test", {"ok": 3, "bad": 4}, seed=9)
    ds = load_dataset(tmp_path, size=16, progress=False)
    test_paths = {Path(ds.paths[i]).parent.parent.name for i in ds.indices("test")}
    assert test_paths == {"test"}
    assert sum(ds.counts()["test"].values()) == 7
    assert all(Path(ds.paths[i]).parts[-3] == "train" for i in ds.indices("val"))


def test_csv_manifest(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs", {"ok": 6, "bad": 6})
    rows = ["path,label"]
    rows += [f"imgs/ok/ok_{i}.png,ok" for i in range(6)]
    rows += [f"imgs/bad/bad_{i}.png,bad" for i in range(6)]
    rows.append("imgs/missing.png,bad")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "m.csv", size=16, progress=False)
    assert ds.classes == ["bad", "ok"] and len(ds.labels) == 12
    assert _skipped(ds)["missing.png"] == "file not found"
    (tmp_path / "bad.csv").write_text("file,class\nx.png,ok\n")
    with pytest.raises(DataError, match="bad.csv must have a header"):
        load_dataset(tmp_path / "bad.csv", size=16, progress=False)


def test_channels_follow_the_images(small_folder: Path) -> None:
    assert load_dataset(small_folder, size=16, progress=False).channels == 1
    Image.new("RGB", (40, 30), (200, 10, 10)).save(small_folder / "good" / "red.jpg")
    Image.new("I;16", (20, 20), 4000).save(small_folder / "dent" / "deep.png")
    Image.new("CMYK", (20, 20), (0, 50, 50, 0)).save(small_folder / "dent" / "print.tif")
    ds = load_dataset(small_folder, size=16, progress=False)
    assert ds.channels == 3 and ds.images.shape[1:] == (3, 16, 16)
    assert "40x30" in ds.image_sizes


def test_cache_skips_decoding(small_folder: Path, tmp_path: Path) -> None:
    first = load_dataset(small_folder, size=16, cache_dir=tmp_path / "c", progress=False)
    second = load_dataset(small_folder, size=16, cache_dir=tmp_path / "c", progress=False)
    assert not first.from_cache and second.from_cache
    assert np.array_equal(first.images.numpy(), second.images.numpy())
    assert first.fingerprint == second.fingerprint
    # A changed file changes the key: decoded again, new fingerprint.
    write_folder(small_folder, {"good": 1}, seed=42)
    third = load_dataset(small_folder, size=16, cache_dir=tmp_path / "c", progress=False)
    assert not third.from_cache and third.fingerprint != first.fingerprint
