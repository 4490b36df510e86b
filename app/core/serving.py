"""Which run's models answer, which answer in shadow, and switching runs without a restart.

One ``ServedModels`` per web worker holds the run being served (a ``ServedRun`` for decoding and
naming, the ``ModelRunner`` that classifies, and its micro-batcher), why nothing is served when
that is the case, and the runs being retired. Every ``MAXMIN_RELOAD_SECONDS`` it checks which run
should be served (``find_run_dir``); a new one is loaded beside the current one and swapped in when
ready. A request takes the served run once and keeps it to the end, so a request that began before
a switch is finished by the models it was decoded for.

A second ``ServedModels`` with the challenger role follows the challenger run the same way (see
``app.crud.runs``): its models classify every image in shadow while ``MAXMIN_SHADOW`` is on, and
it unloads them when the run is promoted or withdrawn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from app.core.batcher import MicroBatcher
from app.core.config import Settings
from app.core.inference import Classifier, ModelRunner, ModelsUnavailable, ServedRun
from app.core.model_host import HostRun, ModelHostClient, ModelHostUnreachable
from app.core.model_process import ModelProcess, ModelProcessFailed, ModelsToLoad
from app.core.remote import RemoteModels
from app.crud.runs import challenger, keep_serving, serving_run
from app.tables import Run
from inspectlib.checkpoint import CheckpointError

log = logging.getLogger("maxmin_inspect")
LOAD_ERRORS = (ModelsUnavailable, ModelProcessFailed, CheckpointError, ValueError, OSError)
# While the shared model process is being restarted, a worker whose models could not load because
# of that tries again this often, not only every MAXMIN_RELOAD_SECONDS: the new one is up within
# seconds, and until the worker has loaded, its requests get 503.
HOST_RETRY_S = 0.5


def find_run_dir(settings: Settings, sessions: sessionmaker) -> Path | None:
    """The run to serve: the setting, else the registered run most recently chosen to serve
    (`POST /reports/{id}/serve`; before any choice, the newest registered), else the newest on
    disk."""
    if settings.run_dir is not None:
        return settings.run_dir
    try:
        with sessions() as session:
            run = serving_run(session)
        if run is not None and Path(run.run_dir).is_dir():
            return Path(run.run_dir)
    except DBAPIError:
        pass
    found = sorted(settings.runs_dir.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def find_challenger_dir(settings: Settings, sessions: sessionmaker) -> Path | None:
    """The challenger run to classify in shadow; None when there is none or shadow is off."""
    if not settings.shadow:
        return None
    try:
        with sessions() as session:
            run = challenger(session)
    except DBAPIError:
        return None
    return Path(run.run_dir) if run is not None and Path(run.run_dir).is_dir() else None


def _close(runner: ModelRunner | None, batcher: MicroBatcher | None) -> None:
    if batcher is not None:
        batcher.close()
    if isinstance(runner, ModelProcess | HostRun | RemoteModels):
        runner.close()


class ServedModels:
    """The served run of one web worker, and the switch to the next."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker,
        on_restart=None,  # noqa: ANN001
        role: str = "champion",
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.role = role  # champion (answers) or challenger (answers in shadow)
        self._find = find_run_dir if role == "champion" else find_challenger_dir
        self.run_id: int | None = None  # the served run's id in the registry, if registered
        self._on_restart = on_restart  # counts this worker's model-process restarts
        self.classifier: ServedRun | None = None  # read once per request
        self.runner: ModelRunner | None = None
        self.batcher: MicroBatcher | None = None
        self.models_error: str | None = None  # why nothing is served
        self.reload_error: str | None = None  # why the run chosen to serve is not the one served
        self.failed_run: tuple[Path, float] | None = None  # not tried again before retry_s
        self.host_down = False  # only the shared model process was down: retry in moments
        self.host: ModelHostClient | None = None
        self._retiring: list[tuple[threading.Timer, ModelRunner, MicroBatcher]] = []
        self._switching = threading.Lock()
        self._closing = False

    def build(self, run_dir: Path) -> tuple[ServedRun, ModelRunner]:
        """What this worker holds of ``run_dir``'s models (decoding, classes, versions) and the
        runner of the models. Raises one of LOAD_ERRORS, naming the problem."""
        settings = self.settings
        if settings.inference_url:
            # The forms' metadata names the versions; the server holds the same files.
            served = ServedRun(run_dir, settings.ab_models, "onnxruntime", settings.model_form)
            served.runtime = "inference server"
            runner = RemoteModels(
                settings.inference_url, list(served.models), settings.model_timeout_seconds
            )
            if problem := runner.ping():
                runner.close()
                raise ModelProcessFailed(problem)
            return served, runner
        if settings.model_host:
            # `serve` with several workers: the models run once, in the host it started.
            if self.host is None:
                self.host = ModelHostClient(
                    settings.model_host,
                    bytes.fromhex(settings.model_host_key or ""),
                    settings.model_timeout_seconds,
                )
            served = ServedRun(run_dir, settings.ab_models, settings.runtime, settings.model_form)
            return served, HostRun(self.host, run_dir)
        if not settings.model_process:
            classifier = Classifier(
                run_dir,
                settings.ab_models,
                settings.device,
                settings.parallel_models,
                runtime=settings.runtime,
                form=settings.model_form,
            )
            return classifier, classifier
        # The models run in their own process; this one only decodes and names things.
        served = ServedRun(run_dir, settings.ab_models, settings.runtime, settings.model_form)
        models = ModelsToLoad(
            run_dir,
            tuple(settings.ab_models),
            settings.device,
            settings.threads,
            settings.parallel_models,
            settings.runtime,
            settings.model_form,
        )
        runner = ModelProcess(
            models, batch_timeout_s=settings.model_timeout_seconds, on_restart=self._on_restart
        )
        return served, runner

    def install(self, classifier: ServedRun, runner: ModelRunner) -> tuple:
        """Serve ``classifier`` through ``runner`` from now on; returns what served before."""
        settings = self.settings
        batcher = MicroBatcher(
            runner,
            settings.batch_max_size,
            settings.batch_wait_ms,
            settings.queue_max,
            settings.batch_decoding_wait_ms,
        )
        classifier.batcher = batcher
        self.run_id = self._registered_id(classifier.run_dir)
        old = (self.classifier, self.runner, self.batcher)
        self.runner, self.batcher = runner, batcher
        self.classifier = classifier  # last: requests see the new models from here on
        self.models_error = self.reload_error = None
        return old

    def _registered_id(self, run_dir: Path) -> int | None:
        try:
            with self.sessions() as session:
                query = select(Run.id).where(Run.run_dir == str(Path(run_dir).resolve()))
                return session.execute(query).scalar_one_or_none()
        except DBAPIError:
            return None

    def _retire(self, old: tuple, grace_s: float) -> None:
        """Close what served before, once the requests that still hold it are done (or at
        shutdown, whichever comes first)."""
        _, runner, batcher = old
        timer = threading.Timer(grace_s, _close, (runner, batcher))
        timer.daemon = True
        self._retiring = [r for r in self._retiring if r[0].is_alive()]  # done: forget
        self._retiring.append((timer, runner, batcher))
        timer.start()

    def load(self) -> None:
        """Load the A/B models at start; on failure keep serving and say why in /readyz."""
        run_dir = self._find(self.settings, self.sessions)
        if run_dir is None:
            if self.role != "champion":
                return  # no challenger: nothing to load, nothing wrong
            self.models_error = (
                f"no trained models found in {self.settings.runs_dir}: "
                "run `maxmin-inspect train DATA`"
            )
            return
        try:
            self.install(*self.build(run_dir))
        except LOAD_ERRORS as exc:
            self.models_error = f"cannot load models from {run_dir}: {exc}"
            self.failed_run = self._failed(run_dir, exc)
            self.host_down = isinstance(exc, ModelHostUnreachable)
            log.error(self.models_error)
            return
        self._keep_serving(run_dir)

    @staticmethod
    def _failed(run_dir: Path, exc: Exception) -> tuple[Path, float] | None:
        """What the follower remembers of a run that did not load, so as not to try it again
        before ``retry_s``; nothing when only the shared model process was down (being
        restarted): that is tried again within ``HOST_RETRY_S``."""
        if isinstance(exc, ModelHostUnreachable):
            return None
        return (Path(run_dir).resolve(), time.monotonic())

    def _keep_serving(self, run_dir: Path) -> None:
        if self.settings.run_dir is not None or self.role != "champion":
            return  # pinned by the setting: no choice to record
        try:
            with self.sessions() as session:
                keep_serving(session, run_dir)
        except DBAPIError as exc:
            log.warning("could not record %s as the run served: %s", run_dir, exc)

    def follow(self, retry_s: float = 60.0) -> bool:
        """Switch to the run the service should serve when it has changed (one chosen to serve,
        or a first run registered): load it beside the current models, then swap. A run that
        cannot be loaded leaves the current models serving, says why in /readyz, and is tried
        again after ``retry_s``. True when it switched."""
        with self._switching:  # one switch at a time; shutdown waits for one in progress
            if self._closing:
                return False
            return self._follow(retry_s)

    def _follow(self, retry_s: float) -> bool:
        run_dir = self._find(self.settings, self.sessions)
        current = self.classifier
        if run_dir is None:
            if self.role == "champion" or current is None:
                return False
            # The challenger was promoted or withdrawn (or shadow switched off): unload it.
            old = (current, self.runner, self.batcher)
            self.classifier = self.runner = self.batcher = None
            self.run_id = None
            self._retire(old, grace_s=self.settings.model_timeout_seconds)
            log.info("no challenger in shadow any more (was %s)", current.run_dir)
            return True
        run_dir = Path(run_dir).resolve()
        if current is not None and current.run_dir.resolve() == run_dir:
            self.reload_error = self.failed_run = None  # e.g. a failed choice undone
            self.host_down = False
            if current.refresh_thresholds():
                log.info("new operating point for %s: %s", run_dir, current.thresholds)
            return False
        failed = self.failed_run
        if failed is not None and failed[0] == run_dir and time.monotonic() - failed[1] < retry_s:
            return False
        try:
            classifier, runner = self.build(run_dir)
        except LOAD_ERRORS as exc:
            self.failed_run = self._failed(run_dir, exc)
            self.host_down = isinstance(exc, ModelHostUnreachable)
            problem = f"cannot load models from {run_dir}: {exc}"
            log.error(problem)
            if current is None:
                self.models_error = problem
            else:
                self.reload_error = f"{problem}; still serving {current.run_dir}"
            return False
        old = self.install(classifier, runner)
        self.failed_run = None
        self.host_down = False
        self._retire(old, grace_s=self.settings.model_timeout_seconds)
        log.info(
            "now %s: the models of %s",
            "serving" if self.role == "champion" else "in shadow",
            run_dir,
        )
        worse = [
            f"{name} ({m['macro_f1_change'] * 100:+.1f} points of macro F1, McNemar p = "
            f"{m['p_value']:.3f})"
            for name, m in ((classifier.form_study or {}).get("models") or {}).items()
            if m["worse"]
        ]
        if worse:
            log.warning(
                "the %s form answered reliably worse than fp32 in %s's compression study: %s; "
                "serve another form (MAXMIN_MODEL_FORM) unless that loss is acceptable",
                classifier.form,
                run_dir,
                ", ".join(worse),
            )
        self._keep_serving(run_dir)
        return True

    async def follow_forever(self, every_s: float) -> None:
        """``follow`` every ``every_s`` (more often while the shared model process restarts)."""
        while True:
            await asyncio.sleep(min(every_s, HOST_RETRY_S) if self.host_down else every_s)
            try:
                await run_in_threadpool(self.follow)
            except Exception:  # noqa: BLE001 - keep following; the log says what went wrong
                log.exception("could not check which run to serve")

    def close(self) -> None:
        """Stop serving: a switch in progress ends first, none starts after; every runner, the
        retiring ones too, is closed now."""
        with self._switching:
            self._closing = True
        for timer, runner, batcher in self._retiring:
            if timer.is_alive():  # not closed yet: close now, not at the end of its grace
                timer.cancel()
                _close(runner, batcher)
        _close(self.runner, self.batcher)
        if self.host is not None:
            self.host.close()
