"""Serving benchmark: this service against the plain endpoint, side by side in one run.

Starts each server in its own process on loopback, drives it with bench/load.py (another process)
at each concurrency, stops it, and prints one JSON summary. This service stores every image and
prediction (SQLite in a fresh temporary folder); the plain endpoint stores nothing.
Usage: python bench/serve_bench.py RUN_DIR IMAGES_DIR [--seconds 15] [--workers auto] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"server at {url} did not start")


def line_key(env: dict, cwd: Path) -> str:
    """A new line key in the service's database, as a line system would send: the access check
    is part of the cost."""
    made = subprocess.run(
        [sys.executable, "-m", "maxmin_inspect", "keys", "create", "--role", "line"]
        + ["--name", "bench"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip().splitlines()[-1]


def _tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _measure(
    name: str,
    cmd: list[str],
    env: dict,
    port: int,
    args: argparse.Namespace,
    ready_path: str,
    load_env: dict | None = None,
) -> list[dict]:
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base + ready_path, proc)
        rows = []
        for c in args.concurrency:
            cpu0 = _tree_cpu(proc.pid)
            load = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "bench" / "load.py"),
                    f"{base}/predict",
                    str(args.images),
                    "--seconds",
                    str(args.seconds),
                    "--max-requests",
                    str(args.max_requests),
                    "--procs",
                    str(args.client_procs),
                    "--concurrency",
                    str(c),
                ]
                + (["--distinct"] if args.distinct else []),
                capture_output=True,
                text=True,
                env=load_env or env,
                check=True,
            )
            r = [json.loads(line) for line in load.stdout.splitlines() if line.startswith("{")][-1]
            # CPU time of the server and its children (workers, model processes) per request.
            r["server_cpu_ms_per_request"] = round(
                (_tree_cpu(proc.pid) - cpu0) * 1000 / max(r["requests"], 1), 2
            )
            print(
                f"{name:>6} c={c:>3}: {r['requests_per_s']:>7} req/s "
                f"p50 {r['p50_ms']} p99 {r['p99_ms']} errors {r['errors']} "
                f"cpu {r['server_cpu_ms_per_request']} ms/req",
                file=sys.stderr,
            )
            rows.append(r)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _measure_service(side: str, args: argparse.Namespace, env: dict, workers: str) -> list[dict]:
    """This service in a fresh data folder (SQLite), with its default settings (``service``), or
    with one model process shared by all workers (``service-shared``) or one per worker
    (``service-per-worker``) whatever the device, or with the database writer as a process of its
    own (``service-writer-process``) or as a thread of each worker (``service-writer-thread``)
    whatever the device, or with a sync per new image file instead of one per group
    (``service-file-sync``), or with the A/B models one after the other instead of side by side
    (``service-serial-models``), or with a challenger run (a copy of the served one, so the same
    compute) classifying every image in shadow (``service-shadow``), or running the run's ONNX
    forms in ONNX Runtime (``service-onnx-fp32``, ``service-onnx-int8``: `maxmin-inspect compress`
    first; ``service-onnx-pruned-int8``: `compress --prune` first), or those forms run in the web
    process instead of a model process of its own (``service-in-process-onnx-int8``,
    ``service-in-process-onnx-pruned-int8``)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = _port()
        svc_env = {
            **env,
            "MAXMIN_DATA_DIR": tmp,
            "MAXMIN_RUN_DIR": str(args.run_dir.resolve()),
            "MAXMIN_DEVICE": args.device,
        }
        svc_env.pop("DATABASE_URL", None)
        svc_env.pop("MAXMIN_SHARED_MODELS", None)
        svc_env.pop("MAXMIN_WRITER_PROCESS", None)
        svc_env.pop("MAXMIN_IMAGE_SYNC", None)
        svc_env.pop("MAXMIN_PARALLEL_MODELS", None)
        svc_env.pop("MAXMIN_RUNTIME", None)
        svc_env.pop("MAXMIN_MODEL_FORM", None)
        svc_env.pop("MAXMIN_MODEL_PROCESS", None)
        if side.startswith("service-in-process-"):
            svc_env["MAXMIN_MODEL_PROCESS"] = "false"
        onnx = side.replace("service-in-process-", "service-", 1)
        if onnx.startswith("service-onnx-"):
            svc_env["MAXMIN_RUNTIME"] = "onnxruntime"
            svc_env["MAXMIN_MODEL_FORM"] = onnx.removeprefix("service-onnx-")
        if side in ("service-shared", "service-per-worker"):
            svc_env["MAXMIN_SHARED_MODELS"] = "true" if side == "service-shared" else "false"
        if side in ("service-writer-process", "service-writer-thread"):
            svc_env["MAXMIN_WRITER_PROCESS"] = str(side == "service-writer-process").lower()
        if side == "service-file-sync":
            svc_env["MAXMIN_IMAGE_SYNC"] = "file"
        if side == "service-serial-models":
            svc_env["MAXMIN_PARALLEL_MODELS"] = "false"
        if side == "service-shadow":
            # The served run as the champion, a copy of it as the challenger, in shadow.
            shutil.copytree(args.run_dir, Path(tmp) / "challenger")
            for run, extra in ((args.run_dir, ["--serve"]), (Path(tmp) / "challenger", [])):
                subprocess.run(
                    [sys.executable, "-m", "maxmin_inspect", "import-run", str(run), *extra],
                    env=svc_env,
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                )
        load_env = {**env, "MAXMIN_API_KEY": line_key(svc_env, ROOT)}
        serve = [sys.executable, "-m", "maxmin_inspect", "serve", "--port", str(port)]
        serve += ["--workers", workers]
        name = {
            "service": "ours",
            "service-shared": "ours-s",
            "service-per-worker": "ours-w",
            "service-writer-process": "ours-p",
            "service-writer-thread": "ours-t",
            "service-file-sync": "ours-f",
            "service-serial-models": "ours-1",
            "service-shadow": "ours-sh",
            "service-onnx-fp32": "ours-o32",
            "service-onnx-int8": "ours-o8",
            "service-onnx-pruned-int8": "ours-p8",
            "service-in-process-onnx-int8": "ours-io8",
            "service-in-process-onnx-pruned-int8": "ours-ip8",
        }[side] + ("" if workers == args.workers else f"@{workers}")
        return _measure(name, serve, svc_env, port, args, "/readyz", load_env)


SERVICE_SIDES = (
    "service",
    "service-shared",
    "service-per-worker",
    "service-writer-process",
    "service-writer-thread",
    "service-file-sync",
    "service-serial-models",
    "service-shadow",
    "service-onnx-fp32",
    "service-onnx-int8",
    "service-onnx-pruned-int8",
    "service-in-process-onnx-int8",
    "service-in-process-onnx-pruned-int8",
)


def _one_run(args: argparse.Namespace, env: dict) -> dict:
    """One side-by-side run: each side in turn (the plain endpoint first), at every concurrency."""
    sides: dict = {}
    port = _port()
    if "plain" in args.sides:
        sides["plain"] = _measure(
            "plain",
            [
                sys.executable,
                str(ROOT / "bench" / "plain_server.py"),
                str(args.run_dir),
                "--port",
                str(port),
                "--device",
                args.device,
            ],
            env,
            port,
            args,
            "/docs",
        )
    for side in args.sides:
        if side != "plain":
            base, _, workers = side.partition("@")
            sides[side] = _measure_service(base, args, env, workers or args.workers)
    return sides


def _median_rows(runs: list[dict], side: str) -> list[dict]:
    rows = []
    for k, c in enumerate(runs[0][side]):
        level = [run[side][k] for run in runs]
        row = {"concurrency": c["concurrency"], "runs": len(level)}
        for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "server_cpu_ms_per_request"):
            row[key] = statistics.median(r[key] for r in level)
        row["errors"] = sum(r["errors"] for r in level)
        timing = [r["server_timing_median_ms"] for r in level if r["server_timing_median_ms"]]
        if timing:
            row["server_timing_median_ms"] = {
                key: round(statistics.median(t[key] for t in timing), 3) for key in timing[0]
            }
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument(
        "--workers",
        default="auto",
        help="this service's web processes (serve --workers; default: auto, as the service); a "
        "side named SIDE@N runs with N instead",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--repeats", type=int, default=1, help="runs; the summary takes medians")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="every upload a new file, as on a line (bench/load.py --distinct)",
    )
    parser.add_argument(
        "--sides",
        default="plain,service",
        help="comma-separated: plain, service (default settings), service-shared (one model "
        "process for all workers), service-per-worker (one each), service-writer-process and "
        "service-writer-thread (the database writer as a process of its own, or as a thread of "
        "each worker), service-file-sync (a sync per new image file, MAXMIN_IMAGE_SYNC=file), "
        "service-serial-models (the A/B models one after the other, MAXMIN_PARALLEL_MODELS=false), "
        "service-shadow (a challenger classifying every image in shadow), service-onnx-fp32 and "
        "service-onnx-int8, service-onnx-pruned-int8 (the run's ONNX forms in ONNX Runtime), "
        "service-in-process-onnx-int8 and service-in-process-onnx-pruned-int8 (the same, in the "
        "web process: MAXMIN_MODEL_PROCESS=false)",
    )
    args = parser.parse_args()
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for side in args.sides:
        if side != "plain" and side.partition("@")[0] not in SERVICE_SIDES:
            parser.error(f"unknown side {side!r}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    summary: dict = {
        "cpus": os.cpu_count(),
        "device": args.device,
        "seconds": args.seconds,
        "workers": args.workers,
        "repeats": args.repeats,
        "distinct_uploads": args.distinct,
        "runs": [],
    }
    for k in range(args.repeats):
        print(f"run {k + 1} of {args.repeats}", file=sys.stderr)
        summary["runs"].append(_one_run(args, env))
    for side in args.sides:
        summary[side] = _median_rows(summary["runs"], side)
    for name, (a, b) in {
        "throughput_ratio": ("service", "plain"),
        "shared_over_per_worker": ("service-shared", "service-per-worker"),
        "writer_process_over_thread": ("service-writer-process", "service-writer-thread"),
        "group_sync_over_file_sync": ("service", "service-file-sync"),
        "parallel_over_serial_models": ("service", "service-serial-models"),
        "shadow_over_service": ("service-shadow", "service"),
        "onnx_int8_over_service": ("service-onnx-int8", "service"),
        "onnx_fp32_over_service": ("service-onnx-fp32", "service"),
        "onnx_int8_over_plain": ("service-onnx-int8", "plain"),
        "pruned_int8_over_service": ("service-onnx-pruned-int8", "service"),
        "pruned_int8_over_onnx_fp32": ("service-onnx-pruned-int8", "service-onnx-fp32"),
    }.items():
        if a in summary and b in summary:
            summary[name] = {
                str(x["concurrency"]): round(
                    y["requests_per_s"] / max(x["requests_per_s"], 1e-9), 2
                )
                for x, y in zip(summary[b], summary[a], strict=True)
            }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
