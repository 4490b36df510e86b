"""Finding the labelled images of a data source: class folders (optionally train/ and test/
inside) or a CSV manifest. Shared by the trainer and the service's training page."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from inspectlib.imaging import IMAGE_SUFFIXES


class DataError(ValueError):
    """The data cannot be used for a fair comparison; the message names the file or class."""


@dataclass
class Entry:
    """One labelled file found in the data source."""

    path: Path
    label: str
    split: str | None = None  # "train"/"test" when the data came pre-split


def _is_hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def _scan_class_dirs(root: Path, split: str | None, skipped: list[dict[str, str]]) -> list[Entry]:
    entries: list[Entry] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for loose in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        skipped.append({"path": str(loose), "reason": "not inside a class folder"})
    for class_dir in class_dirs:
        files = [p for p in sorted(class_dir.rglob("*")) if p.is_file()]
        found = False
        for path in files:
            if _is_hidden(path.relative_to(root)):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": str(path), "reason": "not an image file type"})
                continue
            entries.append(Entry(path, class_dir.name, split))
            found = True
        if not found:
            where = f"{split}/{class_dir.name}" if split else class_dir.name
            raise DataError(f"class folder '{where}' in {root} holds no image files")
    return entries


def scan_source(source: Path) -> tuple[list[Entry], list[dict[str, str]]]:
    """Find the labelled files in a class-folder tree (optionally train/ and test/) or a CSV."""
    skipped: list[dict[str, str]] = []
    if not source.exists():
        raise DataError(f"data path {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source} is neither a folder of class folders nor a CSV manifest")
        return _scan_manifest(source, skipped), skipped
    train, test = source / "train", source / "test"
    if train.is_dir() and test.is_dir():
        entries = _scan_class_dirs(train, "train", skipped) + _scan_class_dirs(
            test, "test", skipped
        )
        train_classes = {e.label for e in entries if e.split == "train"}
        test_classes = {e.label for e in entries if e.split == "test"}
        for name in sorted(train_classes ^ test_classes):
            side = "test" if name in train_classes else "train"
            raise DataError(f"class '{name}' has no folder under {source / side}")
    else:
        entries = _scan_class_dirs(source, None, skipped)
    if not entries:
        raise DataError(f"no image files found in {source} (expected <class>/<image> folders)")
    return entries, skipped


def _scan_manifest(path: Path, skipped: list[dict[str, str]]) -> list[Entry]:
    entries: list[Entry] = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"CSV manifest {path} must have a header with 'path' and 'label'")
            for line, row in enumerate(reader, start=2):
                raw, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not raw or not label:
                    skipped.append({"path": f"{path}:{line}", "reason": "empty path or label"})
                    continue
                file = Path(raw) if Path(raw).is_absolute() else path.parent / raw
                if not file.is_file():
                    skipped.append({"path": str(file), "reason": "file not found"})
                    continue
                split = (row.get("split") or "").strip() or None
                if split not in (None, "train", "test"):
                    raise DataError(
                        f"{path}:{line}: split must be 'train' or 'test', not {split!r}"
                    )
                entries.append(Entry(file, label, split))
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV manifest {path} is not UTF-8 text: {exc}") from None
    if not entries:
        raise DataError(f"CSV manifest {path} lists no existing image files")
    if any(e.split for e in entries) and not all(e.split for e in entries):
        raise DataError(f"CSV manifest {path}: give a split for every row or for none")
    return entries
