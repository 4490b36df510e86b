"""The models on an inference server (Triton, KServe, MLServer), over the Open Inference Protocol.

With ``MAXMIN_INFERENCE_URL`` set, each worker sends its micro-batches to that server instead of
to a model process of its own: ``POST {url}/v2/models/<model>/infer`` (KServe v2 REST), the A/B
models side by side. The server serves the repository that ``maxmin-inspect export --triton``
wrote from the same run, so the input is the service's own uint8 arrays and the output the class
probabilities. A server that is down, slow or answering errors raises ``ModelProcessFailed``,
which the routes and ``/readyz`` treat exactly as a dead model process: 503 with the reason.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from app.core.model_process import ModelProcessFailed
from inspectlib import onnxform


class RemoteModels:
    """A ``ModelRunner`` whose models run on an Open Inference Protocol server."""

    def __init__(self, url: str, names: list[str], timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.names = list(names)
        self.device = f"inference server {self.url}"
        # One connection pool per worker, reused across batches; timeouts bound every call.
        self._client = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            limits=httpx.Limits(max_connections=2 * len(self.names) + 2),
        )
        self._pool = ThreadPoolExecutor(len(self.names), thread_name_prefix="remote")

    def ping(self) -> str | None:
        """None while the server answers that every model is ready, else why not."""
        try:
            for name in self.names:
                r = self._client.get(f"/v2/models/{name}/ready", timeout=2.0)
                if r.status_code != 200:
                    return (
                        f"inference server {self.url}: model {name!r} not ready "
                        f"(HTTP {r.status_code})"
                    )
        except httpx.HTTPError as exc:
            return f"inference server {self.url} unreachable: {type(exc).__name__}: {exc}"
        return None

    def _infer(self, name: str, arrays: np.ndarray) -> tuple[np.ndarray, float]:
        body = {
            "inputs": [
                {
                    "name": onnxform.INPUT_NAME,
                    "shape": list(arrays.shape),
                    "datatype": "UINT8",
                    "data": arrays.ravel().tolist(),
                }
            ],
            "outputs": [{"name": onnxform.OUTPUT_NAME}],
        }
        t0 = time.perf_counter()
        try:
            r = self._client.post(f"/v2/models/{name}/infer", json=body)
        except httpx.TimeoutException:
            raise ModelProcessFailed(f"inference server {self.url} timed out on {name}") from None
        except httpx.HTTPError as exc:
            raise ModelProcessFailed(
                f"inference server {self.url} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        if r.status_code != 200:
            raise ModelProcessFailed(
                f"inference server {self.url} answered HTTP {r.status_code} for {name}: "
                f"{r.text[:200]}"
            )
        try:
            outputs = {o["name"]: o for o in r.json()["outputs"]}
            out = outputs[onnxform.OUTPUT_NAME]
            probs = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelProcessFailed(
                f"inference server {self.url} sent an answer for {name} that is not "
                f"{onnxform.OUTPUT_NAME} N x K: {exc}"
            ) from None
        if probs.shape[0] != len(arrays):
            raise ModelProcessFailed(
                f"inference server {self.url} answered {probs.shape[0]} rows for {len(arrays)} "
                f"images ({name})"
            )
        return probs, (time.perf_counter() - t0) * 1000 / max(len(arrays), 1)

    def classify(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """Per model: class probabilities (N x K) and the round trip's time per image in ms."""
        arrays = np.ascontiguousarray(arrays, dtype=np.uint8)
        futures = {name: self._pool.submit(self._infer, name, arrays) for name in self.names}
        return {name: f.result() for name, f in futures.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()
