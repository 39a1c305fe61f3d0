"""The training loop shared by the single-process ``fit`` and the Ray Train adapter.

Reproducibility: every epoch reseeds torch from (seed, epoch, rank) and shuffles with a
sampler seeded by (seed, epoch), so an epoch is replayable. A run resumed from the
checkpoint of epoch k therefore continues bit-for-bit (on CPU) like an uninterrupted run.
The learning rate is a pure function of the epoch (no scheduler state to restore).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.methods.base import Method, StepOutput


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | step | constant
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs (step schedule)
    gamma: float = 0.1
    warmup_epochs: int = 0


def lr_at(epoch: int, epochs: int, cfg: OptimConfig) -> float:
    """Learning rate of (0-based) ``epoch``: linear warm-up, then cosine/step/constant."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        drops = sum(epoch >= int(m * epochs) for m in cfg.milestones)
        return cfg.lr * cfg.gamma**drops
    if cfg.schedule == "cosine":
        span = max(epochs - cfg.warmup_epochs, 1)
        t = (epoch - cfg.warmup_epochs) / span
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))
    raise ValueError(f"train.schedule must be one of ['cosine', 'step', 'constant'], got {cfg.schedule!r}")


def set_epoch_lr(optimizer: torch.optim.Optimizer, method: Method, epoch: int, epochs: int, cfg: OptimConfig) -> float:
    """Set the model's lr of ``epoch`` and let the method's own optimizers follow it (SPROUT's
    γ_β decays with the model's, SPEC §2 step 5); returns that lr (logged as ``train/lr``)."""
    lr = lr_at(epoch, epochs, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    method.set_lr(lr)
    return lr


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    torch.manual_seed(derived_seed(seed, epoch, rank))


# the augmentation's own random stream, apart from the methods' (global) one
AUGMENT_STREAM = 0x4155474D


def augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator of the training-batch augmentation of (seed, epoch, rank): replayable."""
    return torch.Generator().manual_seed(derived_seed(seed, epoch, rank, AUGMENT_STREAM))


def make_loader(
    dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1,
    drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False,
) -> DataLoader:
    """A loader whose shard (rank of world_size) and order depend only on (seed, epoch).

    Training (shuffle) drops the uneven tail across workers so shards are disjoint and equal
    (DDP needs equal step counts); evaluation shards rank::world_size with no padding, so
    summed counts are exact.
    """
    sampler: Sampler[int]
    if shuffle:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last or world_size > 1
        )
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
    )


class ShardSampler(Sampler[int]):
    """Indices rank, rank+world, ... of range(n): disjoint, covering, no padding."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss: the message names the epoch, step and method."""


@dataclass
class EpochStats:
    """Sums (not means), so workers can be combined exactly by adding."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    steps: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.loss_sum, self.correct, self.count, self.steps], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor, seconds: float, extra: dict[str, float]) -> EpochStats:
        return cls(float(t[0]), int(t[1]), int(t[2]), int(t[3]), seconds, extra)

    def metrics(self, n_images: int | None = None) -> dict[str, float]:
        n = self.count or 1
        images = self.count if n_images is None else n_images
        return {
            "train/loss": self.loss_sum / n,
            "train/acc": self.correct / n,
            "time/epoch_s": self.seconds,
            "time/samples_per_s": images / self.seconds if self.seconds > 0 else 0.0,
            **self.extra,
        }


@dataclass
class StepOptions:
    """GPU-path options; all also run on CPU (bf16 autocast, channels-last, accumulation)."""

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    grad_accum: int = 1
    non_blocking: bool = False


def _to_device(batch: Any, device: torch.device, opts: StepOptions) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        x, y = batch["image"], batch["label"]
    else:
        x, y = batch
    x = x.to(device, non_blocking=opts.non_blocking)
    if opts.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=opts.non_blocking).long()


def train_step(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    opts: StepOptions | None = None,
    accum: int = 1,
    update: bool = True,
    where: str = "",
    check_finite: bool = True,
) -> StepOutput:
    """One optimizer step's work on one minibatch (one replay for Free-AT).

    ``method.loss`` under the configured autocast, a finiteness check, ``backward`` of
    loss/accum and, when ``update``, the θ step, ``method.after_step()`` (SPROUT's β ascent,
    Free-AT's δ update) and ``zero_grad``. ``train_epoch`` calls it for every batch, and
    ``benchmarks/step_cost.py`` times exactly this.
    """
    opts = opts or StepOptions()
    dev = x.device.type
    with torch.autocast(dev, dtype=opts.autocast_dtype, enabled=opts.autocast_dtype is not None):
        out = method.loss(model, x, y)
    if check_finite and not torch.isfinite(out.loss.detach()):
        raise NonFiniteLossError(
            f"non-finite loss {float(out.loss.detach())} {where}(method {method.name}); the last good checkpoint is kept"
        )
    (out.loss / accum).backward()
    if update:
        optimizer.step()
        method.after_step()
        optimizer.zero_grad(set_to_none=True)
    return out


def train_epoch(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    device: torch.device,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    opts: StepOptions | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    finite_check_every: int = 20,
    any_rank: Callable[[Tensor], Tensor] | None = None,
    augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
) -> EpochStats:
    """One epoch. Returns local sums; the caller combines workers and logs.

    ``augment`` (``trainables.data.augment``) transforms each training batch, the same for
    every method, with a generator seeded from (seed, epoch, rank).

    Loss sums and the non-finite flag stay on the device (no host sync per step); every
    ``finite_check_every`` steps and at the end the flag is read, combined over workers with
    ``any_rank`` (an all-reduce: every rank then raises together, so DDP never hangs), and a
    NaN/Inf loss raises NonFiniteLossError naming the epoch, step and method.
    """
    opts = opts or StepOptions()
    seed_epoch(seed, epoch, rank)
    set_loader_epoch(loader, epoch)
    model.train()
    stats = EpochStats()
    extra_sums: dict[str, float] = {}
    t0 = time.perf_counter()
    # Free-AT steps the optimizer on every replay: nothing to accumulate, and dividing its
    # loss by grad_accum would only shrink its learning rate.
    accum = max(int(opts.grad_accum), 1) if method.replays == 1 else 1
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    aug_gen = augment_generator(seed, epoch, rank) if augment is not None else None

    def check(upto: int) -> None:
        flag = (first_bad >= 0).to(torch.float64).reshape(1)
        if any_rank is not None:
            flag = any_rank(flag)
        if float(flag) > 0:
            where = int(first_bad) + 1 if int(first_bad) >= 0 else upto
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, step {where} (method {method.name}); "
                "training stopped and the last good checkpoint is kept"
            )

    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x, y = _to_device(batch, device, opts)
        if augment is not None:
            x = augment(x, aug_gen)
        for _ in range(method.replays):
            out = train_step(
                model, method, optimizer, x, y, opts=opts, accum=accum,
                update=method.replays > 1 or (step + 1) % accum == 0, check_finite=False,
            )
            bad = ~torch.isfinite(out.loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
        n = y.shape[0]
        loss_sum += out.loss.detach().double() * n
        correct += (out.logits.detach().argmax(1) == out.labels).sum()
        stats.count += n
        stats.steps += 1
        if finite_check_every and (step + 1) % finite_check_every == 0:
            check(step + 1)
        for k, v in out.metrics.items():
            extra_sums[k] = extra_sums.get(k, 0.0) + v * n
        if on_step is not None:
            on_step(step)
    if accum > 1 and stats.steps % accum and method.replays == 1:
        optimizer.step()
        method.after_step()
        optimizer.zero_grad(set_to_none=True)
    check(stats.steps)
    stats.loss_sum, stats.correct = float(loss_sum), int(correct)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - t0
    stats.extra = {k: v / max(stats.count, 1) for k, v in extra_sums.items()} | method.epoch_metrics()
    return stats


def evaluate_counts(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    *,
    attack: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    max_batches: int | None = None,
    opts: StepOptions | None = None,
) -> tuple[int, int]:
    """(correct, count) on ``loader``, optionally under ``attack`` (exact counts, not means)."""
    opts = opts or StepOptions()
    model.eval()
    correct = count = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _to_device(batch, device, opts)
        if attack is not None:
            x = attack(model, x, y)
        with torch.no_grad(), torch.autocast(device.type, dtype=opts.autocast_dtype, enabled=opts.autocast_dtype is not None):
            correct += int((model(x).argmax(1) == y).sum())
        count += y.shape[0]
    return correct, count


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, method: Method, epoch: int, **meta: Any) -> dict[str, Any]:
    """Everything needed to resume after ``epoch`` (0-based, completed)."""
    return {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "method": method.state_dict(),
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
        "meta": meta,
    }


def restore_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None, method: Method | None) -> int:
    """Load a training state; returns the next epoch to run."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if method is not None and state.get("method") is not None:
        method.load_state_dict(state["method"])
    return int(state["epoch"]) + 1


def fit(
    model: nn.Module,
    method: Method,
    train_set: Dataset,
    val_set: Dataset | None,
    *,
    epochs: int,
    batch_size: int,
    optim: OptimConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | None = None,
    val_attack: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    opts: StepOptions | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
) -> list[dict[str, float]]:
    """Single-process training with per-epoch checkpoints; resumes from ``checkpoint_dir``."""
    device = torch.device(device)
    model.to(device)
    method.to(device)
    optimizer = build_optimizer(model, optim)
    epochs = max(1, math.ceil(epochs / method.epoch_divisor))
    start = 0
    if checkpoint_dir is not None and (torch_path := _existing(checkpoint_dir)):
        start = restore_state(load_checkpoint(torch_path), model, optimizer, method)
    train_loader = make_loader(train_set, batch_size, seed=seed, shuffle=True)
    val_loader = make_loader(val_set, 256, seed=seed, shuffle=False) if val_set is not None else None
    history = []
    for epoch in range(start, epochs):
        lr = set_epoch_lr(optimizer, method, epoch, epochs, optim)
        stats = train_epoch(model, method, optimizer, train_loader, device, epoch=epoch, seed=seed, opts=opts,
                            augment=augment)
        metrics = stats.metrics() | {"train/lr": lr}
        if val_loader is not None:
            c, n = evaluate_counts(model, val_loader, device, opts=opts)
            metrics["val/clean_acc"] = c / max(n, 1)
            if val_attack is not None:
                c, n = evaluate_counts(model, val_loader, device, attack=val_attack, opts=opts)
                metrics["val/pgd_acc"] = c / max(n, 1)
        history.append(metrics)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, training_state(model, optimizer, method, epoch))
        if log is not None:
            log(epoch, metrics)
    return history


def _existing(checkpoint_dir: str) -> str | None:
    from pathlib import Path

    from trainables.checkpoint import FILE

    p = Path(checkpoint_dir) / FILE
    return str(checkpoint_dir) if p.is_file() else None
