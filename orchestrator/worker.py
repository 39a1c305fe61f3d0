"""What a training worker builds from a config: data shard, model, method, optimizer.

Shared by the Ray Train adapter and by benchmarks that run the same loop without Ray,
so both paths do exactly the same work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainables import DATASETS, MODELS
from trainables.data import dataset_info
from trainables.data.augment import build_augment
from trainables.loop import OptimConfig, StepOptions, build_optimizer, evaluate_counts, make_loader
from trainables.methods import Method, build_method


@dataclass
class WorkerRun:
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    optim: OptimConfig
    epochs: int
    train_loader: Any
    val_loader: Any
    num_classes: int
    # the training-batch augmentation of data.augment (None: none), the same for every method
    augment: Any = None


def scaled_lr(cfg: Any, world: int) -> float:
    t = cfg.train
    if t.lr_reference_batch is None:
        return t.lr
    return t.lr * cfg.data.batch_size * world * t.grad_accum / t.lr_reference_batch


def optim_config(cfg: Any, world: int = 1) -> OptimConfig:
    t = cfg.train
    return OptimConfig(
        lr=scaled_lr(cfg, world), momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov, schedule=t.schedule,
        milestones=tuple(t.milestones), gamma=t.gamma, warmup_epochs=t.warmup_epochs,
    )


def build_model(cfg: Any, info: Any) -> nn.Module:
    return MODELS[cfg.model.name](
        num_classes=info.num_classes, in_channels=info.channels, mean=info.mean, std=info.std, **cfg.model.options()
    )


def datasets(cfg: Any, splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    d = cfg.data
    return {s: DATASETS[d.name](root=d.root, split=s, **d.options(cfg.train.seed)) for s in splits}


def is_streaming(cfg: Any) -> bool:
    """ImageNet Parquet shards are streamed by Ray Data instead of a map-style Dataset."""
    return cfg.data.name == "imagenet" and cfg.data.format == "parquet"


class RayShardLoader:
    """An epoch iterable over this worker's Ray Data shard (a fresh stream per epoch).

    ``seen`` collects the row ids of the last epoch, for sharding audits.
    """

    def __init__(self, split: str, batch_size: int, device: torch.device, channels_last: bool, train: bool) -> None:
        self.split, self.batch_size, self.device = split, batch_size, device
        self.channels_last, self.train = channels_last, train
        self.seen: list[int] = []

    def __iter__(self):
        import ray.train

        from orchestrator.ray_data import iter_worker_batches

        self.seen = []
        shard = ray.train.get_dataset_shard(self.split)
        for batch in iter_worker_batches(shard, self.batch_size, self.device, channels_last=self.channels_last,
                                         drop_last=self.train):
            self.seen.extend(int(i) for i in batch.pop("id").tolist())
            yield batch


def data_info(cfg: Any) -> Any:
    """Classes, channels, size and normalisation of the configured data (no training data loaded)."""
    if is_streaming(cfg):
        from orchestrator.ray_data import imagenet_parquet_info

        return imagenet_parquet_info(cfg.data.root, image_size=cfg.data.image_size or 224)
    return dataset_info(datasets(cfg, ("val",))["val"])


def build_run(cfg: Any, *, rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> WorkerRun:
    device = torch.device(device)
    if is_streaming(cfg):
        from orchestrator.ray_data import imagenet_parquet_info

        info = imagenet_parquet_info(cfg.data.root, image_size=cfg.data.image_size or 224)
        ds = None
    else:
        ds = datasets(cfg)
        info = dataset_info(ds["train"])
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    model = build_model(cfg, info)
    if cfg.train.init_from:
        from orchestrator.storage import model_state_from

        model.load_state_dict(model_state_from(cfg.train.init_from))
    if cfg.train.sync_batchnorm and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = build_method(
        cfg.method, _params_dict(cfg), num_classes=info.num_classes, lr=scaled_lr(cfg, world), seed=cfg.train.seed
    ).to(device)
    optimizer = build_optimizer(model, optim_config(cfg, world))
    epochs = max(1, math.ceil(cfg.train.epochs / method.epoch_divisor))
    if ds is None:
        train_loader: Any = RayShardLoader("train", cfg.data.batch_size, device, cfg.train.channels_last, True)
        val_loader: Any = RayShardLoader("val", cfg.data.eval_batch_size, device, cfg.train.channels_last, False)
        return WorkerRun(model, method, optimizer, optim_config(cfg, world), epochs, train_loader, val_loader,
                         info.num_classes, build_augment(cfg.data.augment))
    pin = device.type == "cuda"
    train_loader = make_loader(
        ds["train"], cfg.data.batch_size, seed=cfg.train.seed, shuffle=True, rank=rank, world_size=world,
        num_workers=cfg.data.loader_workers, pin_memory=pin,
    )
    val_loader = make_loader(
        ds["val"], cfg.data.eval_batch_size, seed=cfg.train.seed, shuffle=False, rank=rank, world_size=world,
        num_workers=cfg.data.loader_workers, pin_memory=pin,
    ) if len(ds["val"]) else None
    return WorkerRun(model, method, optimizer, optim_config(cfg, world), epochs, train_loader, val_loader, info.num_classes,
                     build_augment(cfg.data.augment))


def _params_dict(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg.method_params())


def step_options(cfg: Any, device: torch.device) -> StepOptions:
    return StepOptions(
        autocast_dtype=torch.bfloat16 if cfg.train.bf16 else None,
        channels_last=cfg.train.channels_last,
        grad_accum=cfg.train.grad_accum,
        non_blocking=device.type == "cuda",
    )


def val_attack(cfg: Any):
    from trainables import ATTACKS

    steps = cfg.train.val_pgd_steps
    if steps == 0 or cfg.eval.eps == 0:
        return None
    step_size = cfg.eval.eps / 5 if cfg.eval.step_size_rule == "paper" else None
    return ATTACKS["pgd"](eps=cfg.eval.eps, steps=steps, step_size=step_size)


def evaluate_val(
    cfg: Any, model: nn.Module, run: WorkerRun, device: torch.device,
    reduce: Callable[[torch.Tensor], torch.Tensor], opts: StepOptions,
) -> dict[str, float]:
    """val/clean_acc and val/pgd_acc with counts summed over workers (exact)."""
    if run.val_loader is None:
        return {}
    out: dict[str, float] = {}
    c, n = evaluate_counts(model, run.val_loader, device, max_batches=cfg.train.val_max_batches, opts=opts)
    t = reduce(torch.tensor([c, n], dtype=torch.float64))
    out["val/clean_acc"] = float(t[0] / max(t[1], 1))
    attack = val_attack(cfg)
    if attack is not None:
        c, n = evaluate_counts(model, run.val_loader, device, attack=attack, max_batches=cfg.train.val_max_batches, opts=opts)
        t = reduce(torch.tensor([c, n], dtype=torch.float64))
        out["val/pgd_acc"] = float(t[0] / max(t[1], 1))
    return out
