"""A whole ``train`` run on a small generated folder, the report contract, checkpoints, the CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inspectlib.checkpoint import CheckpointError, load_checkpoint, preprocess_of
from inspectlib.preprocess import normalize
from maxmin_inspect.main import main
from tests.helpers import write_folder
from training.data import load_dataset
from training.engine import RunResult, TrainConfig, bf16_native, fit, precision

FAST = [
    "--size",
    "24",
    "--epochs",
    "4",
    "--batch-size",
    "8",
    "--seeds",
    "2",
    "--latency-seconds",
    "0.2",
    "--quiet",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("poc")
    data = write_folder(root / "parts", {"good": 14, "scratch": 14, "dent": 8}, easy=True)
    (data / "good" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = root / "run"
    argv = ["train", str(data), "--out", str(out), "--cache-dir", str(root / "c"), *FAST]
    assert main([*argv, "--good-class", "good"]) == 0
    return out


def test_report_meets_the_contract(run_dir: Path) -> None:
    r = json.loads((run_dir / "report.json").read_text())
    ds = r["dataset"]
    assert ds["classes"] == ["dent", "good", "scratch"]
    assert set(ds["counts"]) == {"train", "val", "test"}
    assert sum(sum(c.values()) for c in ds["counts"].values()) == 36
    assert ds["skipped"][0]["path"].endswith("broken.jpg")
    assert {"image_sizes", "duplicates", "fingerprint"} <= set(ds)
    assert set(r["models"]) == {"baseline", "maxmin", "maxmin_half"}
    for name, m in r["models"].items():
        assert m["arch"] == name
        assert m["params"] > 0 and m["flops"] > 0 and m["weights_bytes"] > 0
        assert m["peak_memory_bytes"] >= 0 and m["train_seconds"]["total"] > 0
        for metric in ("accuracy", "macro_f1"):
            assert len(m[metric]["per_seed"]) == 2
            assert all(0 <= v <= 1 for v in m[metric]["per_seed"])
        assert set(m["per_class"]) == set(ds["classes"])
        assert {"precision", "recall", "f1"} <= set(m["per_class"]["good"])
        n_test = sum(ds["counts"]["test"].values())
        assert sum(map(sum, m["confusion_matrix"])) == n_test * (2 - len(m["diverged"]))
        assert len(m["curves"]) == 2 and len(m["curves"][0]["val_accuracy"]) == 4
        assert m["latency_ms"]["cpu"]["p50"] > 0 and m["latency_ms"]["cpu"]["p99"] > 0
        assert m["throughput"]["cpu"] > 0
    assert r["models"]["maxmin"]["params"] > 1.8 * r["models"]["baseline"]["params"]
    for name in ("maxmin", "maxmin_half"):
        c = r["comparison"][name]
        assert {"mean", "low", "high"} <= set(c["accuracy_difference"])
        assert len(c["mcnemar"]) == 2 and 0 <= c["mcnemar"][0]["p_value"] <= 1
        assert math.isclose(
            c["params_ratio"], r["models"][name]["params"] / r["models"]["baseline"]["params"]
        )
        assert c["latency_ratio"] > 0 and c["train_time_ratio"] > 0
    # The verdict states the figures of the report, in the report's metric.
    score = r["models"]["maxmin"]["score"]["mean"]
    if score is not None:
        assert f"{score * 100:.1f}%" in r["verdict"] and "macro F1" in r["verdict"]
    # 14/14/8 images: skewed enough that macro F1 decides, and the report says why.
    assert r["metric"]["name"] == "macro_f1" and "skewed" in r["metric"]["reason"]
    assert "macro F1" in r["verdict"]
    # Every model was offered the same recipes, and the report shows what each got.
    grid = [(g["optimizer"], g["lr"]) for g in r["search"]["grid"]]
    assert r["search"]["enabled"] and len(grid) >= 3 and r["search"]["seconds"] > 0
    for m in r["models"].values():
        recipe = m["recipe"]
        assert [(t["optimizer"], t["lr"]) for t in recipe["trials"]] == grid
        # The fixed recipe's full run met the best of the other short trials, carried on to the
        # whole budget, and the better full run chose the recipe: the short trials pick the
        # challenger, full runs the recipe.
        (fixed, *rest), finals = recipe["trials"], recipe["finals"]
        challenger = max(rest, key=lambda t: t["val"])
        assert [(f["optimizer"], f["lr"]) for f in finals] == [
            (fixed["optimizer"], fixed["lr"]),
            (challenger["optimizer"], challenger["lr"]),
        ]
        assert finals[0]["val"] >= fixed["val"] and finals[1]["val"] >= challenger["val"]
        chosen = finals[1] if finals[1]["val"] > finals[0]["val"] else finals[0]
        assert (recipe["optimizer"], recipe["lr"]) == (chosen["optimizer"], chosen["lr"])
        # The winning full run is the first seed's run (unless a retry replaced it), with or
        # without augmentation: no seed is trained twice for it.
        if not any(t["slot"] == 0 for t in m["retries"]):
            first = m["checkpoints"][0]
            assert first["seed"] == 0
            assert math.isclose(first["best_val"], chosen["val"], abs_tol=1e-5)
        # The first seed, trained with and without augmentation for the whole budget; one
        # decision for every model, on the mean of all their pairs, and the report says which.
        check = m["recipe"]["augment_check"]
        assert check["kept"] in ("with", "without")
        assert check["kept"] == r["search"]["augmentation"]["kept"]
        assert m["recipe"]["augment"] == ([] if check["kept"] == "without" else ["shift", "hflip"])
        if "difference" in check:
            d = check["difference"]
            assert d["low"] <= d["mean"] <= d["high"]
            assert abs(d["mean"] - (check["val_without"] - check["val_with"])) < 1e-3
            assert (check["model_kept"] == "without") == (d["mean"] > 0)
    pooled = r["search"]["augmentation"]
    if "difference" in pooled:
        own = [
            m["recipe"]["augment_check"]["difference"]["mean"]
            for m in r["models"].values()
            if "difference" in m["recipe"]["augment_check"]
        ]
        assert pooled["pairs"] == len(own)
        assert abs(pooled["difference"]["mean"] - float(np.mean(own))) < 1e-3
        assert (pooled["kept"] == "without") == (pooled["difference"]["mean"] > 0)
        assert m["score"]["metric"] == "macro_f1"
        for key in ("escape_rate", "false_reject_rate"):
            if m["seeds_failed"] < m["seeds_run"]:
                assert 0 <= m[key]["low"] <= m[key]["rate"] <= m[key]["high"] <= 1
        assert isinstance(m["retries"], list)
    for name in ("maxmin", "maxmin_half"):
        d = r["comparison"][name]["difference"]
        assert "bootstrap" in d["method"] and d["low"] <= d["mean"] <= d["high"]
    # The split is written down, so other code can repeat the comparison on the same images.
    rows = (run_dir / "split.csv").read_text().splitlines()
    assert rows[0] == "path,label,split" and len(rows) == 1 + 36
    # On CUDA the default run (bf16 autocast where supported) trains with captured graphs.
    expected = ["CUDA graph"] if r["run"]["device"].startswith("cuda") else ["eager"]
    assert r["run"]["training_step"] == expected and r["run"]["training_step_fallbacks"] == []


def test_html_report_is_self_contained(run_dir: Path) -> None:
    html = (run_dir / "report.html").read_text()
    assert html.count("<svg") >= 5  # cost, curves, three confusion matrices
    assert "broken.jpg" in html and "Verdict" in html
    assert "full runs" in html and "became the first seed" in html  # what the search did
    assert re.search(r"(eager|CUDA graph) training steps", html)  # how it trained, for the record
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing loaded from outside
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").read_text().count("<svg") >= 5


def test_checkpoint_rebuilds_and_predicts_like_training(run_dir: Path) -> None:
    r = json.loads((run_dir / "report.json").read_text())
    ckpt = run_dir / r["models"]["maxmin"]["checkpoint"]
    model, meta = load_checkpoint(ckpt)
    pre = preprocess_of(meta)
    assert meta["classes"] == r["dataset"]["classes"] and pre.size == 24
    assert list(pre.mean) == r["dataset"]["normalization"]["mean"]
    assert meta["data_fingerprint"] == r["dataset"]["fingerprint"]
    assert {"arch", "model_kwargs", "preprocess", "metrics", "created_at"} <= set(meta)
    assert "image_size" not in meta and "normalization" not in meta  # stated once, in preprocess
    # From the files on disk, through the checkpoint's own preprocessing, the model scores the
    # test split exactly as training recorded it.
    rows = [row for row in csv.DictReader((run_dir / "split.csv").open()) if row["split"] == "test"]
    x = torch.from_numpy(
        np.stack([pre.array(pre.image(Path(r["path"]).read_bytes())) for r in rows])
    )
    y = np.array([meta["classes"].index(r["label"]) for r in rows])
    with torch.no_grad():
        pred = model(normalize(x, *pre.tensors())).argmax(1).numpy()
    assert float(np.mean(pred == y)) == pytest.approx(meta["metrics"]["test_accuracy"], abs=1e-9)


def test_tampered_checkpoint_is_refused(run_dir: Path, tmp_path: Path) -> None:
    src = run_dir / "checkpoints" / "baseline-seed0"
    for ext in (".json", ".safetensors"):
        (tmp_path / f"b{ext}").write_bytes(src.with_suffix(ext).read_bytes())
    weights = tmp_path / "b.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="altered or replaced"):
        load_checkpoint(tmp_path / "b")
    # Metadata that names another architecture does not fit the weights.
    weights.write_bytes(src.with_suffix(".safetensors").read_bytes())
    meta = json.loads((tmp_path / "b.json").read_text())
    meta["arch"] = "maxmin"
    (tmp_path / "b.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit its metadata"):
        load_checkpoint(tmp_path / "b")


def test_divergence_is_detected_and_excluded(small_folder: Path) -> None:
    ds = load_dataset(small_folder, size=16, progress=False)
    splits = {
        s: (ds.images[ds.indices(s)], ds.labels[ds.indices(s)]) for s in ("train", "val", "test")
    }
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    kwargs = {"num_classes": 3, "in_channels": 1, "image_size": 16}
    res = fit("baseline", kwargs, splits, mean, std, 0, TrainConfig(epochs=3, lr=1e6, device="cpu"))
    assert res.diverged is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "{tmp}/nope"], "nope does not exist"),
        (["train", "{data}", "--models", "baseline,vgg"], "unknown model 'vgg'"),
        (["train", "{data}", "--augment", "rotate"], "unknown augmentation rotate"),
        (["train", "{data}", "--device", "tpu"], "unknown device 'tpu'"),
        (["train", "{data}", "--good-class", "ok"], "--good-class 'ok' is not a class"),
        (["report", "{tmp}"], "report.json not found"),
    ],
)
def test_cli_errors_are_clear(
    argv: list[str],
    message: str,
    small_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.format(tmp=tmp_path, data=small_folder) for a in argv]
    out = tmp_path / "run"
    assert main([*argv, "--quiet", "--out", str(out)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # a run that cannot start leaves no empty run folder behind


def test_cli_rejects_bad_numbers(capsys: pytest.CaptureFixture[str], small_folder: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", str(small_folder), "--epochs", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_demo_data_command(tmp_path: Path) -> None:
    assert main(["demo-data", str(tmp_path / "d"), "--per-class", "3", "--image-size", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "dent",
        "good",
        "scratch",
        "spots",
    ]
    assert len(list((tmp_path / "d" / "spots").glob("*.png"))) == 3


def test_finished_train_registers_its_run(run_dir: Path) -> None:
    from sqlalchemy import select

    from app.core.config import Settings
    from app.core.db import make_engine, session_factory
    from app.tables import Run

    engine = make_engine(Settings().db_url)  # the throwaway database the tests point at
    with session_factory(engine)() as session:
        runs = {r.run_dir: r for r in session.execute(select(Run)).scalars()}
    engine.dispose()
    assert str(run_dir.resolve()) in runs
    run = runs[str(run_dir.resolve())]
    assert set(run.model_versions) == {"baseline", "maxmin", "maxmin_half"}
    assert run.verdict == json.loads((run_dir / "report.json").read_text())["verdict"]


def test_import_run_command(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MAXMIN_DATA_DIR", str(tmp_path / "var"))
    assert main(["db", "upgrade"]) == 0
    assert main(["import-run", str(run_dir)]) == 0
    assert "as report 1" in capsys.readouterr().out
    from app.core.config import Settings
    from app.core.db import command_session
    from app.crud.runs import serving_run
    from app.tables import Run

    with command_session(Settings().db_url) as session:
        assert session.get(Run, 1).served_at is None  # registered, not chosen
    assert main(["import-run", str(run_dir), "--serve"]) == 0
    assert "serves its models from now on" in capsys.readouterr().out
    with command_session(Settings().db_url) as session:
        assert serving_run(session).served_at is not None and serving_run(session).id == 1
    assert main(["import-run", str(tmp_path)]) == 2
    assert "report.json not found" in capsys.readouterr().err
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert main(["db", "upgrade"]) == 1
    err = capsys.readouterr().err
    assert "database error" in err and "Traceback" not in err
    # A URL whose driver is not installed (here pymysql) is named, not a ModuleNotFoundError.
    monkeypatch.setenv("DATABASE_URL", "mysql+pymysql://nobody@127.0.0.1:1/none")
    assert main(["db", "upgrade"]) == 1
    err = capsys.readouterr().err
    assert "driver 'mysql+pymysql'" in err and "not installed" in err and "Traceback" not in err


def test_class_weights_balance_rare_classes() -> None:
    from training.engine import class_weights

    labels = torch.tensor([0] * 80 + [1] * 15 + [2] * 5)
    w = class_weights(labels, 3, "inverse")
    # Each class's total weight is the same, so a rare defect counts as much as the common one.
    totals = torch.bincount(labels, minlength=3).float() * w
    assert torch.allclose(totals, totals[0].expand(3))
    assert w[2] > w[1] > w[0] and abs(float((w * torch.bincount(labels)).sum()) - 100) < 1e-4
    # The default goes half way: the rare class weighs 4x the common one, not 16x.
    s = class_weights(labels, 3)
    assert float(s[2] / s[0]) == pytest.approx(4.0) and s[2] > s[1] > s[0]
    assert abs(float((s * torch.bincount(labels)).sum()) - 100) < 1e-4
    assert torch.equal(class_weights(labels, 3, "none"), torch.ones(3))


def test_precision_follows_the_hardware_and_the_option(
    run_dir: Path, small_folder: Path, tmp_path: Path
) -> None:
    r = json.loads((run_dir / "report.json").read_text())
    # auto: bf16 autocast only where this machine computes in bf16 natively
    assert r["run"]["precision"] == precision(torch.device("cpu"), True)
    assert r["run"]["precision"] == ("bf16 autocast" if bf16_native("cpu") else "fp32")
    assert precision(torch.device("cpu"), False) == "fp32"
    out = tmp_path / "fp32"
    args = ["train", str(small_folder), "--out", str(out), *FAST]
    assert main([*args, "--models", "baseline", "--seeds", "1", "--precision", "fp32"]) == 0
    assert json.loads((out / "report.json").read_text())["run"]["precision"] == "fp32"


def _small_splits(folder: Path, device: torch.device):  # noqa: ANN202
    """The small generated folder at 16 px, resident on ``device``, and the model arguments."""
    ds = load_dataset(folder, size=16, progress=False)
    splits, mean, std = ds.resident(device)
    return splits, mean, std, {"num_classes": 3, "in_channels": ds.channels, "image_size": 16}


def _plain_loop(arch, kwargs, splits, mean, std, seed, cfg, device):  # noqa: ANN001, ANN202
    """The textbook loop the engine must match: PyTorch's SGD-Nesterov or AdamW and one-cycle
    scheduler stepped per batch, augmentation drawn per batch. Returns each epoch's mean loss and
    weights."""
    from models import create_model
    from training.engine import augment, class_weights

    torch.manual_seed(seed)
    model = create_model(arch, **kwargs).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    (x_all, y_all), n = splits["train"], len(splits["train"][0])
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = sum(1 for s in range(0, n, cfg.batch_size) if n - s >= 2)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps + 1, pct_start=0.15, cycle_momentum=False
    )
    weights = class_weights(y_all.cpu(), 3, cfg.class_weighting)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device))
    losses, states = [], []
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:
                continue
            x = augment(normalize(x_all[idx], mean, std), cfg.augment, gen)
            loss = loss_fn(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
        states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return losses, states


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.05), ("adamw", 3e-3)])
def test_training_step_matches_a_plain_loop(
    optimizer: str,
    lr: float,
    small_folder: Path,
    device: torch.device,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine's step (on CUDA a captured graph replayed per batch, eagerly elsewhere) trains
    as the textbook loop does: same losses each epoch, same weights at the kept epoch."""
    from training.engine import TrainStep

    monkeypatch.setattr(TrainStep, "WARMUP", 1)  # capture both batch sizes (8 and 5) early
    if device.type == "cuda":
        # Full fp32 on both sides: cuDNN convolutions default to TF32 (10-bit mantissa), whose
        # rounding Adam turns into whole steps for elements with small gradients.
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    splits, mean, std, kwargs = _small_splits(small_folder, device)
    assert len(splits["train"][0]) % 8 >= 2  # a short last batch, so two graphs
    cfg = TrainConfig(
        epochs=4, batch_size=8, device=str(device), amp=False, optimizer=optimizer, lr=lr
    )
    res = fit("maxmin", kwargs, splits, mean, std, 7, cfg)
    assert res.extra["training_step"] == ("CUDA graph" if device.type == "cuda" else "eager")
    assert res.extra["step_fallback"] is None
    losses, states = _plain_loop("maxmin", kwargs, splits, mean, std, 7, cfg, device)
    assert res.train_loss[-1] < res.train_loss[0]  # it learned, so the comparison means something
    kept = states[res.best_epoch - 1]
    if device.type == "cpu":
        tol = {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(torch.tensor(res.train_loss), torch.tensor(losses), **tol)
        for name, value in res.state_dict.items():
            torch.testing.assert_close(value, kept[name], **tol)
        return
    # cuDNN's kernels are not bitwise deterministic (cudnn.benchmark may pick other algorithms
    # for the two sides), and Adam turns a gradient's rounding noise into a full step for the odd
    # element, so CUDA is held to relative errors: a stale input, learning rate or gradient in the
    # replayed graph would be off by far more than this.
    torch.testing.assert_close(
        torch.tensor(res.train_loss), torch.tensor(losses), rtol=5e-3, atol=1e-4
    )
    errors = {
        name: float((value - kept[name]).norm() / kept[name].norm().clamp_min(1e-12))
        for name, value in res.state_dict.items()
        if value.is_floating_point()
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-2, f"relative differences: {errors}"


def test_cuda_graphs_can_be_switched_off(small_folder: Path, device: torch.device) -> None:
    splits, mean, std, kwargs = _small_splits(small_folder, device)
    cfg = TrainConfig(epochs=1, batch_size=8, device=str(device), cuda_graphs=False)
    assert fit("baseline", kwargs, splits, mean, std, 0, cfg).extra["training_step"] == "eager"


def test_batch_size_one_still_trains(small_folder: Path) -> None:
    """Batches of one image are dropped only as the short tail of larger batches."""
    from training.engine import epoch_plan, steps_per_epoch

    plan, batches = epoch_plan(5, 1, 16, ("hflip",), torch.Generator().manual_seed(0))
    assert len(batches) == steps_per_epoch(5, 1) == 5 and sorted(plan[0].tolist()) == [
        0,
        1,
        2,
        3,
        4,
    ]
    plan, batches = epoch_plan(9, 4, 16, ("hflip",), torch.Generator().manual_seed(0))
    assert [b for _, b in batches] == [4, 4] and steps_per_epoch(9, 4) == 2
    splits, mean, std, kwargs = _small_splits(small_folder, torch.device("cpu"))
    cfg = TrainConfig(epochs=2, batch_size=1, lr=0.002)  # one image per step: a gentler rate
    res = fit("baseline", kwargs, splits, mean, std, 0, cfg)
    assert res.train_loss[0] > 0 and res.train_loss[1] < res.train_loss[0]


def test_search_skips_a_recipe_that_diverges(
    small_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model is offered the same grid; an entry that blows up scores nothing and is passed
    over, so no model is handicapped by a recipe that does not suit it."""
    from training import poc

    monkeypatch.setattr(poc, "SEARCH_GRID", (("sgd", 1e6), ("sgd", 0.02)))
    out = tmp_path / "run"
    argv = ["train", str(small_folder), "--out", str(out), *FAST, "--models", "baseline,maxmin"]
    assert main(argv) == 0
    r = json.loads((out / "report.json").read_text())
    for m in r["models"].values():
        assert [t["lr"] for t in m["recipe"]["trials"]] == [1e6, 0.02]
        assert m["recipe"]["trials"][0]["val"] == 0 and m["recipe"]["lr"] == 0.02
        assert [f["lr"] for f in m["recipe"]["finals"]] == [0.02]
    assert r["search"]["epochs"] == 3 and r["search"]["final_epochs"] == 4
    assert r["search"]["seconds"] > 0


def test_a_run_carried_on_is_the_run_trained_straight_through(small_folder: Path) -> None:
    """The search stops its runs a third of the way through their schedule and carries the best
    on. A carried run, with another run trained in between, is the run trained straight through."""
    from training.engine import Training

    splits, mean, std, kwargs = _small_splits(small_folder, torch.device("cpu"))
    cfg = TrainConfig(epochs=4, batch_size=8)
    straight = fit("maxmin", kwargs, splits, mean, std, 3, cfg)
    run = Training("maxmin", kwargs, splits, mean, std, 3, cfg).advance(1)
    assert run.epoch == 1 and not run.stopped and run.best_score() > 0
    Training("maxmin", kwargs, splits, mean, std, 4, replace(cfg, lr=0.01)).advance(2)
    carried = run.advance().finish()
    assert carried.train_loss == straight.train_loss and carried.best_epoch == straight.best_epoch
    for name, value in straight.state_dict.items():
        torch.testing.assert_close(carried.state_dict[name], value, rtol=0, atol=0)


def test_failed_seeds_are_retried_then_counted_against_the_model(
    small_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = ["train", str(small_folder), "--out", str(out), *FAST, "--models", "baseline,maxmin"]
    assert main([*argv, "--lr", "1e6", "--retries", "2"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["search"]["enabled"] is False  # a fixed --lr is a fixed recipe
    for m in r["models"].values():
        # Each failed seed is retried twice, with a fresh seed each time.
        assert [t["seed"] for t in m["retries"]] == [100, 101, 200, 201]
        assert "training loss became" in m["retries"][0]["reason"]
        assert m["seeds_failed"] == 2 and len(m["diverged"]) == 2
    assert "did not train properly" in r["verdict"]
    html = (out / "report.html").read_text()
    assert "trained again with a fresh seed" in html and "still failed" in html


def _answers(pred: np.ndarray, k: int, diverged: str | None = None) -> RunResult:
    """A run whose kept weights answered ``pred`` on the validation split."""
    prob = np.eye(k, dtype=np.float32)[pred]
    return RunResult(
        arch="baseline",
        seed=0,
        state_dict={},
        train_loss=[1.0],
        val_accuracy=[0.0],
        best_epoch=1,
        test_pred=pred,
        test_prob=prob,
        train_seconds=0.0,
        peak_memory_bytes=0,
        diverged=diverged,
        val_metric=[0.0],
        val_prob=prob,
    )


def test_augmentation_is_decided_on_the_mean_of_every_models_pair() -> None:
    """Augmentation is dropped when the runs without it score higher on the validation split, on
    the mean over every model's pair, as the search picks a recipe; the interval only says how
    sure that is. A pair that did not train is left out."""
    from training.poc import _augment_check

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 100)
    right = y.copy()
    half = np.where(rng.random(len(y)) < 0.5, y, (y + 1) % 3)
    # 300 images: right everywhere against right half the time is beyond any noise.
    check = _augment_check([_answers(half, 3)], [_answers(right, 3)], y, "macro_f1", 3)
    assert check["kept"] == "without" and check["clear"] and check["difference"]["low"] > 0
    assert check["val_without"] == 1.0 and check["val_without"] > check["val_with"]
    check = _augment_check([_answers(right, 3)], [_answers(half, 3)], y, "macro_f1", 3)
    assert check["kept"] == "with" and check["clear"] and check["difference"]["high"] < 0
    # Two more right answers out of 30: higher, within the noise of 30 images, and still the
    # better choice on what the split shows; the report says it is not sure.
    small, a = y[::10], half[::10].copy()
    b = a.copy()
    wrong = np.flatnonzero(b != small)[:2]
    b[wrong] = small[wrong]
    check = _augment_check([_answers(a, 3)], [_answers(b, 3)], small, "accuracy", 3)
    assert check["difference"]["low"] <= 0 < check["difference"]["mean"]
    assert check["kept"] == "without" and not check["clear"] and "noise" in check["reason"]
    # A run that did not train decides nothing.
    failed = _answers(right, 3, diverged="stuck at chance level")
    assert _augment_check([_answers(half, 3)], [failed], y, "accuracy", 3)["kept"] == "with"
    # The mean decides, not a vote: two models a little better without it do not outweigh one
    # model far worse without it.
    near = right.copy()
    near[:3] = (near[:3] + 1) % 3
    check = _augment_check(
        [_answers(right, 3), _answers(near, 3), _answers(near, 3), _answers(right, 3)],
        [_answers(half, 3), _answers(right, 3), _answers(right, 3), failed],
        y,
        "macro_f1",
        3,
    )
    assert check["pairs"] == 3 and check["kept"] == "with" and check["difference"]["mean"] < 0
