"""Two or more builds or settings of this service, side by side: alternating load rounds.

Each side is a `serve` started from a source tree (a `git worktree` of another commit, or this
one) with its own environment; all of them start first and stay up, then `bench/load.py` loads
each in turn, the order reversed every round, so a machine whose speed drifts treats every side
alike. Reports each side's requests/s, p99 and server CPU per request (its process tree) per
round, and their medians. Usage:

    git worktree add ../before HEAD~1
    python bench/serve_ab.py runs/bench-demo data/bench-demo/good \
        --side before=../before --side now=. --side wait2=.:MAXMIN_BATCH_DECODING_WAIT_MS=2 \
        --env MAXMIN_RUNTIME=onnxruntime,MAXMIN_MODEL_FORM=pruned-int8 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_bench import _port, _tree_cpu, line_key  # this folder: the script's own

ROOT = Path(__file__).resolve().parent.parent


def _env(spec: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"not KEY=VALUE: {item!r}")
        pairs[key] = value
    return pairs


def _start(name: str, tree: Path, env: dict, data: Path) -> dict:
    port = _port()
    # The tree's own code first: a worktree of another commit runs as that commit.
    env = {**env, "MAXMIN_DATA_DIR": str(data), "PYTHONPATH": str(tree)}
    key = line_key(env, tree)  # before the server: the command sets up the database
    log = open(data / "serve.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "maxmin_inspect", "serve", "--port", str(port)],
        env=env,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    return {"name": name, "port": port, "key": key, "proc": proc, "log": log, "rounds": []}


def _wait_ready(side: dict, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if side["proc"].poll() is not None:
            raise SystemExit(f"side {side['name']} exited; see its serve.log")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{side['port']}/readyz", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"side {side['name']} not ready within {timeout:g} s")


def _round(side: dict, args: argparse.Namespace) -> dict:
    cpu0 = _tree_cpu(side["proc"].pid)
    load = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            f"http://127.0.0.1:{side['port']}/predict",
        ]
        + [str(args.images), "--seconds", str(args.seconds), "--concurrency", str(args.concurrency)]
        + ["--max-requests", "100000000"],
        env={**os.environ, "MAXMIN_API_KEY": side["key"]},
        capture_output=True,
        text=True,
        check=True,
    )
    r = [json.loads(line) for line in load.stdout.splitlines() if line.startswith("{")][-1]
    cpu = (_tree_cpu(side["proc"].pid) - cpu0) * 1000 / max(r["requests"], 1)
    return {
        "requests_per_s": r["requests_per_s"],
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "server_cpu_ms_per_request": round(cpu, 3),
        "errors": r["errors"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument(
        "--side",
        action="append",
        required=True,
        help="NAME=TREE[:KEY=VALUE,...]: a source tree and that side's own settings",
    )
    p.add_argument("--env", default="", help="KEY=VALUE,... for every side")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    common = {
        **os.environ,
        "MAXMIN_RUN_DIR": str(args.run_dir.resolve()),
        **_env(args.env),
    }
    common.pop("DATABASE_URL", None)  # each side its own SQLite file in its own folder
    sides = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for k, spec in enumerate(args.side):
                name, sep, rest = spec.partition("=")
                tree, _, extra = rest.partition(":")
                if not sep or not tree:
                    raise SystemExit(f"--side wants NAME=TREE[:KEY=VALUE,...], not {spec!r}")
                data = Path(tmp) / f"side{k}"
                data.mkdir()
                env = {**common, **_env(extra)}
                sides.append(_start(name, Path(tree).resolve(), env, data))
            for side in sides:
                _wait_ready(side)
            time.sleep(3)  # every side's other workers finish loading
            for r in range(args.rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    row = _round(side, args)
                    side["rounds"].append(row)
                    print(
                        f"{side['name']:>12} round {r}: {row['requests_per_s']:8.1f} req/s "
                        f"p99 {row['p99_ms']:6.1f} ms, {row['server_cpu_ms_per_request']:.3f} "
                        f"ms CPU/request, errors {row['errors']}",
                        file=sys.stderr,
                    )
        finally:
            for side in sides:
                side["proc"].terminate()
            for side in sides:
                side["proc"].wait(timeout=30)
                side["log"].close()
    summary = {
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "env": _env(args.env),
        "sides": {
            s["name"]: {
                "spec": spec,
                "median": {
                    key: round(statistics.median(r[key] for r in s["rounds"]), 3)
                    for key in ("requests_per_s", "p99_ms", "server_cpu_ms_per_request")
                },
                "errors": sum(r["errors"] for r in s["rounds"]),
                "rounds": s["rounds"],
            }
            for s, spec in zip(sides, args.side, strict=True)
        },
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
