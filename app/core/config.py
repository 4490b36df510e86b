"""Service settings: the only place that reads the environment (prefix ``MAXMIN_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Defaults that work on a fresh machine: SQLite in ./var, models from ./runs, the CPU."""

    model_config = SettingsConfigDict(env_prefix="MAXMIN_", env_file=".env", extra="ignore")

    data_dir: Path = Path("var")  # the SQLite database and the image store live here
    database_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        description="SQLAlchemy URL; default: SQLite at <data_dir>/maxmin.db",
    )
    runs_dir: Path = Path("runs")  # where `maxmin-inspect train` writes its run directories
    run_dir: Path | None = None  # serve this run's checkpoints; default: the newest registered run
    # The training page trains on the folders directly under this one (default <data_dir>/datasets)
    datasets_dir: Path | None = None
    ab_models: list[str] = ["baseline", "maxmin"]  # the models each image is classified by
    device: str = "auto"  # auto: CUDA when present, the CPU otherwise
    # What runs the models: PyTorch on the checkpoints, or ONNX Runtime on the forms that
    # `maxmin-inspect compress` wrote (fp32, int8 quantized, or the network pruned by
    # `compress --prune` in either); onnxruntime runs on the CPU.
    runtime: Literal["torch", "onnxruntime"] = "torch"
    model_form: Literal["fp32", "int8", "pruned-fp32", "pruned-int8"] = "fp32"
    # An Open Inference Protocol server (Triton, KServe, MLServer) that serves the repository
    # `maxmin-inspect export RUN --triton` wrote from the served run: the workers send it their
    # batches instead of running the models (app/core/remote.py). MAXMIN_MODEL_FORM names the
    # form it was given.
    inference_url: str | None = None
    torch_threads: int = 0  # 0: see Settings.threads
    model_process: bool = True  # run the models in a process of their own (no GIL contention)
    # The A/B models side by side, a thread each, rather than one after the other. auto: on the
    # CPU, where the second core is otherwise idle while one model runs; on CUDA the models are
    # queued on the GPU anyway (measured by bench/serve_bench.py --sides).
    parallel_models: Literal["auto", "true", "false"] = "auto"
    # Store predictions from a process of its own (app/core/writer.py: WriterProcess), not from a
    # thread that waits for the busy worker's GIL while holding the SQLite write lock. auto: on
    # CUDA, where cheap models leave the web worker's GIL the limit; a thread on the CPU, where the
    # extra process costs more than it saves (bench/writer_bench.py).
    writer_process: Literal["auto", "true", "false"] = "auto"
    # How a group commit's new image files are made durable before their rows commit: group, one
    # sync of the filesystem for all of them (Linux; elsewhere file), or file, one sync each: one
    # sync per group stores more predictions per second (bench/db_bench.py --ways). A filesystem
    # sync also flushes whatever else was written there: beside a heavy writer, file keeps each
    # sync apart.
    image_sync: Literal["group", "file"] = "group"
    # Where uploaded images go: s3://bucket/prefix puts them in an S3-compatible object store, so
    # that several replicas share them (PostgreSQL holds the rest); unset, the data_dir folder.
    image_store: str | None = None
    s3_endpoint_url: str | None = None  # MinIO or another S3-compatible server; unset: AWS
    model_timeout_seconds: float = 60.0  # a batch not answered by then: 503, new model process
    # How often each worker checks which run to serve (the one chosen last) and switches to it
    # without a restart; 0: only at start. With MAXMIN_RUN_DIR: loads that run again if it failed.
    reload_seconds: float = 5.0
    # The challenger run (registered while another serves) classifies every image too, in shadow:
    # its answers are stored beside the champion's, never returned. false saves its compute, and
    # the dashboard then has no evidence for promoting it.
    shadow: bool = True
    # The promotion rule (docs/service.md): at least this many labelled parts since the challenger
    # started, and the challenger not worse than the champion by more than the margin, at 95 %
    # one-sided confidence, on the escape rate (good class known) or else on accuracy.
    promote_min_labelled: int = Field(default=200, ge=1)
    promote_margin: float = Field(default=0.01, ge=0.0, le=1.0)
    # Several workers: one model process for all of them (app/core/model_host.py), or one each.
    # auto: shared on a GPU (one CUDA context, merged batches); one each on the CPU, where one
    # shared process served fewer requests than one each (bench/serve_bench.py --sides).
    shared_models: Literal["auto", "true", "false"] = "auto"
    model_host: str | None = None  # set by `maxmin-inspect serve` for its workers: the socket
    model_host_key: str | None = None  # and the key that authenticates them to it
    max_files: int = 32  # images per /predict request
    max_file_bytes: int = 20 * 1024 * 1024  # bytes per image
    max_body_bytes: int = 64 * 1024 * 1024  # bytes per request
    max_image_pixels: int = 40_000_000  # decoded size guard against decompression bombs
    max_request_pixels: int = 160_000_000  # decoded pixels of all of one request's images
    # Decoded pixels one worker holds at once: bounds its decoding memory under concurrent uploads.
    decode_budget_pixels: int = 40_000_000
    page_size_max: int = 200
    auth_enabled: bool = True  # API keys and roles; switch off only on a closed test bench
    auth_cache_seconds: float = 2.0  # a revoked key stops working within this time; 0: no cache
    session_secret: str | None = None  # cookie signing key; default: generated in data_dir
    cookie_secure: bool = False  # set true behind HTTPS so the session cookie never goes in clear
    api_docs: bool = True  # /docs (Swagger UI, served locally); false hides it in production
    batch_max_size: int = 64  # images per pass through the models
    batch_wait_ms: float = 0.0  # extra wait for company; 0: batch whatever queued meanwhile
    # The most a pass waits for requests this worker is decoding (none waits with nothing on its
    # way): fewer, larger passes under load (app/core/batcher.py).
    batch_decoding_wait_ms: float = 5.0
    queue_max: int = 512  # waiting requests before new ones get 503 (back-pressure)

    @field_validator("shared_models", "writer_process", "parallel_models", mode="before")
    @classmethod
    def _tristate(cls, value: object) -> object:
        text = str(value).strip().lower()
        aliases = {
            **dict.fromkeys(("1", "yes", "on"), "true"),
            **dict.fromkeys(("0", "no", "off"), "false"),
        }
        return aliases.get(text, text)

    @field_validator("image_store")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value and (not value.startswith("s3://") or not value[5:].split("/", 1)[0]):
            raise ValueError(f"MAXMIN_IMAGE_STORE must be s3://bucket[/prefix], not {value!r}")
        return value or None

    def open_store(self):  # noqa: ANN201
        """The image store these settings name (app.core.storage.open_store)."""
        from app.core.storage import open_store

        return open_store(self.images_dir, self.image_sync, self.image_store, self.s3_endpoint_url)

    @model_validator(mode="after")
    def _servable(self) -> Settings:
        if self.runtime == "torch" and self.model_form != "fp32" and not self.inference_url:
            raise ValueError(
                f"MAXMIN_MODEL_FORM={self.model_form} needs MAXMIN_RUNTIME=onnxruntime or an "
                "MAXMIN_INFERENCE_URL (PyTorch serves the fp32 checkpoints)"
            )
        return self

    @field_validator("ab_models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def core_share(self) -> int:
        """This worker's share of the machine's cores."""
        workers = max(1, int(os.environ.get("WEB_CONCURRENCY", "1")))
        return max(1, (os.cpu_count() or 1) // workers)

    @property
    def threads(self) -> int:
        """Torch threads for the models: the setting, else this worker's share of the cores, less
        one for the web process when the models have a process of their own (torch threads that
        compete with the web process for a core spin and wait)."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, self.core_share - 1) if self.model_process else self.core_share

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def training_datasets_dir(self) -> Path:
        return self.datasets_dir or self.data_dir / "datasets"

    @property
    def db_url(self) -> str:
        if self.database_url:
            # Plain postgres URLs (as hosting platforms hand them out) use the psycopg 3 driver.
            for prefix in ("postgres://", "postgresql://"):
                if self.database_url.startswith(prefix):
                    return "postgresql+psycopg://" + self.database_url[len(prefix) :]
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'maxmin.db').as_posix()}"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
