"""Training and evaluation on a dataset held in one uint8 tensor on the training device.

Every model trained with the same seed sees the same batches in the same order with the same
augmentation, so differences between models come from the models alone.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn

from inspectlib import defaults
from inspectlib.preprocess import normalize
from models import create_model

OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}  # peak of the one-cycle schedule, per optimizer
CLASS_WEIGHTING = ("sqrt", "inverse", "none")
METRICS = ("accuracy", "macro_f1")


@dataclass
class TrainConfig:
    """Budget and optimizer shared by every model and seed of a run."""

    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    # SGD with Nesterov momentum: its steps scale with the gradient. Adam's first steps move every
    # weight by about the learning rate whatever its gradient, which on a wide layer fed only
    # non-negative inputs (MaxMin's doubled maps) shifts whole units past zero (docs/training.md).
    optimizer: str = "sgd"
    lr: float = DEFAULT_LR["sgd"]
    weight_decay: float = 5e-4
    augment: tuple[str, ...] = ("shift", "hflip")  # label-preserving for most part images
    # Loss weights per class: 1/sqrt(frequency) lifts rare defects without letting a handful of
    # images dominate the gradient, as full inverse-frequency weights do at 1:30.
    class_weighting: str = "sqrt"
    select_metric: str = "accuracy"  # which validation figure picks the kept epoch
    device: str = "cpu"
    amp: bool = True  # bf16 autocast where the hardware computes in bf16 (see bf16_native)
    cuda_graphs: bool = True  # on CUDA, replay each training step as a captured graph


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """The unweighted mean of per-class F1 (a class neither present nor predicted counts 0)."""
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    return float(np.mean(np.where(denom > 0, 2 * np.diag(cm) / np.maximum(denom, 1), 0.0)))


def score(metric: str, y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """``metric`` (accuracy or macro_f1) of ``pred`` against ``y``."""
    if metric == "macro_f1":
        return macro_f1(y, pred, k)
    return float(np.mean(y == pred)) if len(y) else 0.0


def chance_score(metric: str, y: np.ndarray, k: int) -> float:
    """What always answering the largest class scores: the floor a trained model must clear."""
    majority = int(np.bincount(y, minlength=k).argmax()) if len(y) else 0
    return score(metric, y, np.full_like(y, majority), k)


@dataclass
class RunResult:
    """What one model trained with one seed produced."""

    arch: str
    seed: int
    state_dict: dict[str, torch.Tensor]
    train_loss: list[float]
    val_accuracy: list[float]
    best_epoch: int
    test_pred: np.ndarray
    test_prob: np.ndarray
    train_seconds: float
    peak_memory_bytes: int
    diverged: str | None = None  # why the run is excluded from the averages, when it is
    extra: dict = field(default_factory=dict)
    val_metric: list[float] = field(default_factory=list)  # cfg.select_metric, per epoch
    val_prob: np.ndarray | None = None  # the kept weights' probabilities on the validation split


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak, or the process's resident-set growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "process_rss_growth"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            proc = psutil.Process()
            self._base = proc.memory_info().rss
            self._max = self._base

            def sample() -> None:
                while not self._stop.wait(0.01):
                    self._max = max(self._max, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, psutil.Process().memory_info().rss)
            self.peak = int(self._max - self._base)


def class_weights(labels: torch.Tensor, num_classes: int, mode: str = "sqrt") -> torch.Tensor:
    """Per-class loss weights, scaled so the average image weighs 1: ``inverse`` frequency makes
    every class count alike, ``sqrt`` goes half way (in log terms), ``none`` weighs all alike."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    if mode == "none":
        return torch.ones(num_classes)
    w = 1.0 / counts if mode == "inverse" else counts.rsqrt()
    return w * counts.sum() / (w * counts).sum()


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether this device computes in bf16 natively: CUDA cards that support it, and CPUs with
    AVX512-BF16 or AMX. Elsewhere bf16 would be emulated, slower than fp32, so it stays off
    (bench/train_bench.py measures both)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        try:
            return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
        except RuntimeError:
            return False
    return False


def precision(device: torch.device, amp: bool) -> str:
    """The arithmetic training uses on ``device``: 'bf16 autocast' or 'fp32'."""
    return "bf16 autocast" if amp and bf16_native(device.type) else "fp32"


def _autocast(device: torch.device, amp: bool, cache: bool = True):  # noqa: ANN202
    enabled = amp and bf16_native(device.type)
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache
    )


def augment_params(n: int, side: int, kinds: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """The random draws for one batch's augmentation, as a 4 x n int64 tensor on the CPU: shift
    rows, shift columns, horizontal flip, vertical flip (0 where that kind is off). Drawn from
    ``gen`` in a fixed order, so every model trained with the same seed gets the same batches."""
    params = torch.zeros(4, n, dtype=torch.int64)
    if "shift" in kinds:
        pad = max(1, side // 8)
        params[0] = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        params[1] = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    if "hflip" in kinds:
        params[2] = torch.rand(n, generator=gen) < 0.5
    if "vflip" in kinds:
        params[3] = torch.rand(n, generator=gen) < 0.5
    return params


def apply_augment(x: torch.Tensor, params: torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
    """Batched random shift (reflect-padded, up to 1/8 of the side) and flips, drawn beforehand
    by :func:`augment_params` (on x's device). No host synchronisation, so a CUDA graph can
    hold it."""
    n, c, h, w = x.shape
    if "shift" in kinds:
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = (params[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (params[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if "hflip" in kinds:
        x = torch.where(params[2].bool()[:, None, None, None], x.flip(3), x)
    if "vflip" in kinds:
        x = torch.where(params[3].bool()[:, None, None, None], x.flip(2), x)
    return x


def augment(x: torch.Tensor, kinds: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """Draw and apply one batch's augmentation."""
    return apply_augment(x, augment_params(len(x), x.shape[2], kinds, gen).to(x.device), kinds)


def epoch_plan(
    n: int, batch_size: int, side: int, kinds: tuple[str, ...], gen: torch.Generator
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One epoch's batches: a 5 x m int64 tensor (image index, then the four augmentation draws,
    per column, in training order) and each batch's (start column, size). A last batch of one
    image is dropped when batches are larger: it adds noise and nothing else."""
    order = torch.randperm(n, generator=gen)
    columns, batches, at = [], [], 0
    for start in _batch_starts(n, batch_size):
        idx = order[start : start + batch_size]
        columns.append(torch.cat((idx[None], augment_params(len(idx), side, kinds, gen))))
        batches.append((at, len(idx)))
        at += len(idx)
    plan = torch.cat(columns, dim=1) if columns else torch.zeros(5, 0, dtype=torch.int64)
    return plan, batches


def _batch_starts(n: int, batch_size: int) -> list[int]:
    return [s for s in range(0, n, batch_size) if n - s >= 2 or batch_size == 1]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return len(_batch_starts(n, batch_size))


def one_cycle_lrs(cfg: TrainConfig, total_steps: int) -> list[float]:
    """The learning rate of each optimizer step: PyTorch's one-cycle schedule (warm-up over the
    first 15% of steps to ``cfg.lr``, then cosine annealing), read off a throwaway optimizer so
    the values can be fed to either step. Adam's beta1 stays fixed (no momentum cycling): a
    captured step cannot take a new beta1 each step."""
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        probe, max_lr=cfg.lr, total_steps=total_steps + 1, pct_start=0.15, cycle_momentum=False
    )
    lrs = []
    for _ in range(total_steps):
        lrs.append(float(probe.param_groups[0]["lr"]))
        probe.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        sched.step()
    return lrs


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, lr: float | torch.Tensor
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the model's parameters. A tensor ``lr`` (a CUDA graph's) needs the
    fused SGD kernel or capturable AdamW: the other SGD paths read the rate on the host."""
    graph = isinstance(lr, torch.Tensor)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay,
            fused=True if graph else None,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=cfg.weight_decay, capturable=graph
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")


class TrainStep:
    """One optimizer step per batch: slice, normalise, augment, forward, loss, backward, step.

    On CUDA (``cfg.cuda_graphs``) each batch size's whole step is captured once as a CUDA graph
    and replayed: the small CNNs here are bound by kernel launches, not arithmetic, and a replay
    is one launch instead of a few hundred. Before capture, a few real steps run eagerly on a
    side stream (cuDNN's autotuning and AdamW's state need them, as PyTorch's whole-network
    capture recipe says). Capture failing for any reason falls back to eager steps, with a
    warning, and ``self.mode`` says which ran. The captured and eager steps compute the same thing
    (tests/test_train.py compares them with a plain loop).
    """

    WARMUP = 3  # eager steps per batch size before capture

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        loss_fn: nn.Module,
        cfg: TrainConfig,
    ) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.mean, self.std, self.loss_fn, self.cfg = mean, std, loss_fn, cfg
        self.device = images.device
        self.graphs_wanted = cfg.cuda_graphs and self.device.type == "cuda"
        self.mode = "CUDA graph" if self.graphs_wanted else "eager"
        self.fallback: str | None = None
        # A captured step reads its learning rate from a device tensor at each replay.
        self.lr = (
            torch.tensor(cfg.lr, dtype=torch.float32, device=self.device)
            if self.graphs_wanted
            else cfg.lr
        )
        self.optimizer = make_optimizer(model, cfg, self.lr)
        self.total = torch.zeros((), device=self.device)  # summed loss x batch size, this epoch
        self.seen = 0
        self._buffers: dict[int, torch.Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._eager_runs: dict[int, int] = {}

    def _compute(self, plan: torch.Tensor) -> None:
        idx = plan[0]
        x = apply_augment(
            normalize(self.images[idx], self.mean, self.std), plan[1:], self.cfg.augment
        )
        # The autocast weight cache must stay off under capture (PyTorch's CUDA-graph notes).
        with _autocast(self.device, self.cfg.amp, cache=False):
            loss = self.loss_fn(self.model(x), self.labels[idx])
        loss.backward()
        self.optimizer.step()
        self.total += loss.detach().float() * plan.shape[1]

    def set_lr(self, lr: float) -> None:
        if self.graphs_wanted:
            self.lr.fill_(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def __call__(self, batch: torch.Tensor) -> None:
        """One step on ``batch``, a 5 x b plan slice on the device."""
        size = batch.shape[1]
        self.seen += size
        if not self.graphs_wanted or self.fallback is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self._compute(batch)
            return
        graph = self._graphs.get(size)
        buf = self._buffers.get(size)
        if buf is None:
            buf = self._buffers[size] = torch.empty_like(batch)
        buf.copy_(batch)
        if graph is not None:
            graph.replay()
            return
        runs = self._eager_runs.get(size, 0)
        if runs < self.WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self._compute(buf)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._eager_runs[size] = runs + 1
            return
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates .grad itself
        try:
            with torch.cuda.graph(graph):
                self._compute(buf)
        except RuntimeError as exc:  # capture unsupported here: train on, eagerly
            torch.cuda.synchronize(self.device)
            self.fallback = f"CUDA graph capture failed, trained eagerly: {exc}"
            self.mode = "eager"
            warnings.warn(self.fallback, RuntimeWarning, stacklevel=2)
            self.optimizer.zero_grad(set_to_none=True)
            self._compute(batch)
            return
        self._graphs[size] = graph
        graph.replay()  # capture records the step without running it

    def epoch_loss(self) -> float:
        """The mean training loss since the last call (one host synchronisation)."""
        loss = float(self.total) / max(self.seen, 1)
        self.total.zero_()
        self.seen = 0
        return loss


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 256,
    amp: bool = True,
) -> torch.Tensor:
    """Class probabilities for every image (N x K, float32, on the CPU)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], mean, std)
        with _autocast(images.device, amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


class Training:
    """One model trained with one seed, an epoch at a time: a search can stop a run part-way
    through its schedule and carry it on later, and the carried run is the same run, step for
    step, as one trained straight through. ``fit`` trains one straight through."""

    def __init__(
        self,
        arch: str,
        model_kwargs: dict,
        data: dict[str, tuple[torch.Tensor, torch.Tensor]],
        mean: torch.Tensor,
        std: torch.Tensor,
        seed: int,
        cfg: TrainConfig,
        on_epoch: Callable[[int, float, float], None] | None = None,
        init_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """``init_state``: weights to start from instead of a fresh initialization (a fine-tune,
        as of a pruned model)."""
        self.arch, self.seed, self.cfg, self.on_epoch = arch, seed, cfg, on_epoch
        self.device = device = torch.device(cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.manual_seed(seed)
        model = create_model(arch, **model_kwargs)
        if init_state is not None:
            model.load_state_dict(init_state)
        model = model.to(device)
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.gen = torch.Generator().manual_seed(seed)
        self.train_x, train_y = data["train"]
        self.val_x, _ = data["val"]
        self.test_x, _ = data["test"]
        self.mean, self.std = mean, std
        self.num_classes = model_kwargs["num_classes"]
        weights = class_weights(train_y.cpu(), self.num_classes, cfg.class_weighting)
        loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
        self.step = TrainStep(model, self.train_x, train_y, mean, std, loss_fn, cfg)
        steps = steps_per_epoch(len(self.train_x), cfg.batch_size)
        self.lrs = one_cycle_lrs(cfg, cfg.epochs * steps)
        self.k = 0  # optimizer steps taken: the position in the schedule
        self.train_loss: list[float] = []
        self.val_acc: list[float] = []
        self.val_metric: list[float] = []
        self.best, self.best_epoch, self.best_state = -1.0, 0, None
        self.diverged: str | None = None
        self.val_labels = data["val"][1].cpu().numpy()
        self.seconds = 0.0
        self.peak = 0
        self.memory_method = ""

    @property
    def epoch(self) -> int:
        """Epochs trained so far."""
        return len(self.train_loss)

    @property
    def stopped(self) -> bool:
        """The whole budget is trained, or the run diverged."""
        return self.diverged is not None or self.epoch >= self.cfg.epochs

    def best_score(self) -> float:
        """The best validation score so far; 0 for a run whose loss left the finite numbers."""
        if self.diverged is not None or not self.val_metric:
            return 0.0
        return max(self.val_metric)

    def advance(self, until: int | None = None) -> Training:
        """Train on to epoch ``until`` of the schedule (its end by default), or until diverged."""
        until = self.cfg.epochs if until is None else min(until, self.cfg.epochs)
        cfg, device, model, step = self.cfg, self.device, self.model, self.step
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            while not self.stopped and self.epoch < until:
                model.train()
                plan, batches = epoch_plan(
                    len(self.train_x), cfg.batch_size, self.train_x.shape[2], cfg.augment, self.gen
                )
                plan = plan.to(device)
                for at, size in batches:
                    step.set_lr(self.lrs[self.k])
                    step(plan[:, at : at + size])
                    self.k += 1
                loss = step.epoch_loss()
                probs = evaluate(model, self.val_x, self.mean, self.std, amp=cfg.amp)
                pred = probs.argmax(1).numpy()
                acc = score("accuracy", self.val_labels, pred, self.num_classes)
                metric = score(cfg.select_metric, self.val_labels, pred, self.num_classes)
                epoch = self.epoch
                self.train_loss.append(loss)
                self.val_acc.append(acc)
                self.val_metric.append(metric)
                if self.on_epoch is not None:
                    self.on_epoch(epoch, loss, metric)
                if not math.isfinite(loss):
                    self.diverged = f"training loss became {loss} at epoch {epoch + 1}"
                    break
                if metric > self.best:
                    self.best, self.best_epoch = metric, epoch + 1
                    self.best_state = copy.deepcopy(model.state_dict())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - start
        self.peak = max(self.peak, mem.peak)
        self.memory_method = mem.method
        return self

    def finish(self) -> RunResult:
        """The run's result, with the weights of its best validation epoch."""
        cfg, model, mean, std = self.cfg, self.model, self.mean, self.std
        diverged, best, train_loss = self.diverged, self.best, self.train_loss
        num_classes = self.num_classes
        chance = chance_score(cfg.select_metric, self.val_labels, num_classes)
        if diverged is None and best <= chance + 0.01:
            name = {"macro_f1": "macro F1"}.get(cfg.select_metric, cfg.select_metric)
            last = f"{train_loss[-1]:.3f}" if train_loss else "none"
            diverged = (
                f"stuck at chance level: best validation {name} {best:.3f} vs {chance:.3f} for "
                f"always answering the largest class (training loss {last}, "
                f"ln({num_classes}) = {math.log(num_classes):.3f})"
            )
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        # The test and validation sets are scored in fp32, as the service runs the models.
        prob = evaluate(model, self.test_x, mean, std, amp=False)
        val_prob = evaluate(model, self.val_x, mean, std, amp=False)
        state = {
            k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
            for k, v in model.state_dict().items()
        }
        return RunResult(
            arch=self.arch,
            seed=self.seed,
            state_dict=state,
            train_loss=train_loss,
            val_accuracy=self.val_acc,
            best_epoch=self.best_epoch,
            test_pred=prob.argmax(1).numpy(),
            test_prob=prob.numpy(),
            train_seconds=self.seconds,
            peak_memory_bytes=self.peak,
            diverged=diverged,
            val_metric=self.val_metric,
            val_prob=val_prob.numpy(),
            extra={
                "memory_method": self.memory_method,
                "training_step": self.step.mode,
                "step_fallback": self.step.fallback,
            },
        )


def fit(
    arch: str,
    model_kwargs: dict,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    mean: torch.Tensor,
    std: torch.Tensor,
    seed: int,
    cfg: TrainConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> RunResult:
    """Train ``arch`` with ``seed``; keep the weights of the best validation epoch."""
    run = Training(arch, model_kwargs, data, mean, std, seed, cfg, on_epoch=on_epoch)
    return run.advance().finish()
