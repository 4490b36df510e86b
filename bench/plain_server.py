"""The plain way to serve the two models, for the serving benchmark's side-by-side comparison.

One FastAPI endpoint that decodes with PIL and calls both models per request inside the event
loop, default torch threads, storing nothing. Preprocessing is the product's own, so both sides
compute the same answers. Usage: python bench/plain_server.py RUN_DIR --port 8101
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from inspectlib.checkpoint import load_checkpoint, preprocess_of
from inspectlib.imaging import to_array


def build(run_dir: Path, device: str = "cpu") -> FastAPI:
    report = json.loads((run_dir / "report.json").read_text())
    models = {}
    for name in ("baseline", "maxmin"):
        model, meta = load_checkpoint(run_dir / report["models"][name]["checkpoint"], device)
        models[name] = model
    pre = preprocess_of(meta)
    mean, std = pre.tensors(device)
    app = FastAPI()

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(...)) -> dict:  # noqa: B008
        out = []
        for f in files:
            img = Image.open(io.BytesIO(await f.read()))
            arr = to_array(img, pre.size, pre.channels)
            x = (torch.from_numpy(arr[None]).to(device).float() / 255 - mean) / std
            with torch.no_grad():
                answers = {}
                for name, model in models.items():
                    p = torch.softmax(model(x), 1)[0].cpu().numpy()
                    answers[name] = {
                        "label": meta["classes"][int(np.argmax(p))],
                        "confidence": float(p.max()),
                    }
            out.append(answers)
        return {"data": out, "count": len(out)}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    uvicorn.run(
        build(args.run_dir, args.device), host="127.0.0.1", port=args.port, log_level="warning"
    )
