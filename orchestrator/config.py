"""Typed, validated experiment configuration (SPEC §4).

YAML in, ``ExperimentConfig`` out: unknown keys and out-of-range values are errors that
name the dotted field and the allowed values, raised before any Ray or MLflow resource is
touched. Method sections reuse the training core's parameter dataclasses, so each knob
has one name in the schema, the code, the search spaces and MLflow params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from trainables import DATASETS, METHODS, MODELS

ATTACK_NAMES = (
    "pgd20", "pgd100", "pgd200", "cw_linf", "cw_l2", "autoattack", "transfer", "invariance", "targeted",
    "masking_checks",
)


# data.augment when null: the dataset's standard training augmentation (SPEC §6)
DEFAULT_AUGMENT = {"cifar10": "standard", "imagenet": "imagenet"}


class ConfigError(ValueError):
    """A usage or configuration error: one line naming the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = "small_cnn"
    depth: int | None = Field(default=None, ge=10)
    widen: int | None = Field(default=None, ge=1)
    width: int | None = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; expected one of: {', '.join(MODELS)}")
        return v

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}


class DataConfig(_Strict):
    name: str = "digits"
    root: str | None = None
    format: Literal["folder", "parquet"] = "folder"
    batch_size: int = Field(default=128, ge=1)
    eval_batch_size: int = Field(default=256, ge=1)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    download: bool = False
    image_size: int | None = Field(default=None, ge=1)
    channels: int | None = Field(default=None, ge=1)
    num_classes: int | None = Field(default=None, ge=2)
    num_samples: int | None = Field(default=None, ge=1)
    loader_workers: int = Field(default=0, ge=0)
    # Training-set augmentation, the same for every method (SPEC §6): ``standard`` = pad-4 random
    # crop + horizontal flip (CIFAR-10's default), ``none`` (digits, synthetic), ``imagenet`` = the
    # ImageNet pipeline's own RandomResizedCrop + flip. Null: the dataset's default. Never val/test.
    augment: Literal["standard", "none", "imagenet"] | None = None
    # Seeds the train/validation split only, independent of train.seed: a model initialised
    # from a run with another train.seed never sees this run's validation images in training.
    split_seed: int = Field(default=0, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; expected one of: {', '.join(DATASETS)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_augment(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("augment") is None:
            data = {**data, "augment": DEFAULT_AUGMENT.get(data.get("name", "digits"), "none")}
        return data

    @model_validator(mode="after")
    def _augment_fits(self) -> DataConfig:
        if (self.name == "imagenet") != (self.augment == "imagenet"):
            allowed = "'imagenet' (its RandomResizedCrop + flip pipeline)" if self.name == "imagenet" else "'standard' or 'none'"
            raise ValueError(f"data.augment {self.augment!r} does not fit dataset {self.name!r}; expected {allowed}")
        return self

    @model_validator(mode="after")
    def _root(self) -> DataConfig:
        if self.name in ("cifar10", "imagenet"):
            if not self.root:
                raise ValueError(f"data.root is required for dataset {self.name!r}")
            if "://" not in self.root and not Path(self.root).expanduser().exists() and not self.download:
                raise ValueError(f"data.root {self.root!r} does not exist (dataset {self.name!r})")
        if self.format == "parquet" and self.name != "imagenet":
            raise ValueError("data.format 'parquet' is only for dataset 'imagenet'")
        return self

    def options(self, seed: int) -> dict[str, Any]:
        """Keyword options for DATASETS[name](root=..., split=..., **options)."""
        keys = ("val_fraction", "download", "image_size", "channels", "num_classes", "num_samples")
        opts = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        # the split (and synthetic data) follow data.split_seed, never train.seed (``seed`` is kept
        # in the signature for callers that pass it)
        return {"seed": self.split_seed, **opts}


class TrainConfig(_Strict):
    epochs: int = Field(default=10, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = Field(default=0.1, gt=0)
    warmup_epochs: int = Field(default=0, ge=0)
    # Linear scaling (Goyal et al. 2017): train.lr is for this global batch and is scaled by
    # (batch_size × workers × grad_accum) / lr_reference_batch; null keeps train.lr as given.
    lr_reference_batch: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    init_from: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    grad_accum: int = Field(default=1, ge=1)
    sync_batchnorm: bool = False
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=3, ge=-1)
    checkpoint_keep: int = Field(default=2, ge=1)
    # A checkpoint every N epochs (and after the last): fast epochs on object storage stall less
    # (BENCHMARKS.md, issue 12); a crash retrains up to N - 1 epochs; the selected model is the
    # best of the checkpointed epochs only.
    checkpoint_every: int = Field(default=1, ge=1)
    # Null: the method's own (val/clean_acc for natural and label_smoothing, val/pgd_acc for the
    # robust methods); resolved by ``checkpoint_metric(cfg)``.
    checkpoint_metric: Literal["val/pgd_acc", "val/clean_acc"] | None = None
    val_pgd_steps: int = Field(default=10, ge=0)
    val_max_batches: int | None = Field(default=None, ge=1)

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v and not Path(v).expanduser().exists():
            raise ValueError(f"train.init_from {v!r} does not exist (expected a checkpoint directory or file)")
        return v


class ScalingConfig(_Strict):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    worker_start_timeout_s: float = Field(default=120.0, gt=0)
    worker_start_retries: int = Field(default=2, ge=0)
    # On an autoscaling cluster: how long to wait for the autoscaler to start the plan's nodes
    # (a cold GPU node takes minutes: image pull, driver, Ray start) before the run fails.
    startup_timeout_s: float = Field(default=1200.0, gt=0)
    # e.g. H100, A100, A10G: workers (and evaluation shards) only on nodes with that accelerator
    # (Ray's ``accelerator_type:<name>`` resource, which GPU nodes advertise).
    accelerator_type: str | None = None

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator(cls, v: str | None) -> str | None:
        if v is not None and (not v or not all(c.isalnum() or c in "-_." for c in v)):
            raise ValueError(f"scaling.accelerator_type {v!r}: expected a Ray accelerator type such as H100, A100, A10G")
        return v


class EvalConfig(_Strict):
    attacks: list[Literal[ATTACK_NAMES]] = Field(default_factory=lambda: ["pgd20"])  # type: ignore[valid-type]
    eps: float = Field(default=8 / 255, gt=0, le=1)
    autoattack_eps: float = Field(default=8 / 255, gt=0, le=1)  # SPEC §3: AutoAttack at ℓ∞ 8/255
    # The transfer attack's source: an MLflow run id or a checkpoint path (sprout compare sets its
    # natural model). ``transfer`` in eval.attacks without one is an error, never a silent drop.
    transfer_source: str | None = None
    n_examples: int | None = Field(default=None, ge=1)
    restarts: int = Field(default=1, ge=1)
    step_size_rule: Literal["default", "paper"] = "default"
    batch_size: int = Field(default=256, ge=1)
    cw_l2_budgets: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.5])
    cw_l2_search_steps: int = Field(default=10, ge=1)
    cw_l2_max_iters: int = Field(default=1000, ge=1)
    eps_curve: list[float] = Field(default_factory=list)
    # Ray tasks the test examples are split over; null: as many as training workers.
    num_shards: int | None = Field(default=None, ge=1)

    @field_validator("eps_curve")
    @classmethod
    def _pixel_eps(cls, v: list[float]) -> list[float]:
        bad = [e for e in v if not 0 < e <= 1]
        if bad:
            raise ValueError(f"eval.eps_curve values must be in (0, 1] (pixel units of images in [0, 1]), got {bad[0]!r}")
        return v

    @field_validator("cw_l2_budgets")
    @classmethod
    def _l2_budgets(cls, v: list[float]) -> list[float]:
        if not v or any(not b > 0 for b in v):
            raise ValueError(f"eval.cw_l2_budgets must be a non-empty list of ℓ2 budgets > 0, got {v!r}")
        return v


class TuneConfig(_Strict):
    num_samples: int = Field(default=4, ge=1)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    metric: Literal["val/pgd_acc", "val/clean_acc"] = "val/pgd_acc"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "fifo"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1)


class StorageConfig(_Strict):
    path: str = "./ray_results"


def _method_sections() -> dict[str, Any]:
    sections: dict[str, Any] = {}
    for name in METHODS:
        params = METHODS[name].Params
        params.__pydantic_config__ = ConfigDict(extra="forbid")  # reject unknown knobs
        sections[name] = (params, Field(default_factory=params))
    return sections


class _Base(_Strict):
    experiment: str = "sprout"
    method: str = "sprout"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; expected one of: {', '.join(METHODS)}")
        return v

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("experiment must be a non-empty MLflow experiment name")
        return v

    @model_validator(mode="after")
    def _gpu(self) -> _Base:
        if self.train.bf16 and not self.scaling.use_gpu and self.train.device == "cuda":
            raise ValueError("train.bf16 with train.device 'cuda' needs scaling.use_gpu: true")
        if self.scaling.accelerator_type and not self.scaling.use_gpu:
            raise ValueError("scaling.accelerator_type needs scaling.use_gpu: true")
        return self

    def method_params(self, name: str | None = None) -> Any:
        return getattr(self, name or self.method)

    def flat(self) -> dict[str, Any]:
        """The resolved config flattened to dotted keys (MLflow params)."""
        return flatten(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


ExperimentConfig = create_model("ExperimentConfig", __base__=_Base, **_method_sections())


def checkpoint_metric(cfg: Any) -> str:
    """The metric checkpoints are selected by: train.checkpoint_metric, or the method's own
    (``Method.selection_metric``: val/clean_acc for natural and label_smoothing, val/pgd_acc
    for the robust methods; a natural model's PGD accuracy is ≈ 0 and selects noise). Without a
    PGD validation (``train.val_pgd_steps`` or ``eval.eps`` 0) there is no val/pgd_acc: clean it is,
    and that is the name every report shows."""
    metric = cfg.train.checkpoint_metric or METHODS[cfg.method].selection_metric
    if metric == "val/pgd_acc" and (cfg.train.val_pgd_steps == 0 or cfg.eval.eps == 0):
        return "val/clean_acc"
    return metric


def require_transfer_source(cfg: Any, attacks: list[str] | None = None) -> None:
    """Outside ``sprout compare`` (which sets its natural model), ``transfer`` needs eval.transfer_source."""
    attacks = list(cfg.eval.attacks) if attacks is None else attacks
    if "transfer" in attacks and not cfg.eval.transfer_source:
        raise ConfigError(
            "eval.attacks includes 'transfer' but eval.transfer_source is not set: give the source model's "
            "MLflow run id or checkpoint path (--set eval.transfer_source=...), or drop 'transfer' "
            "(sprout compare sets it to its natural model)"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"])
    if e["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if loc == "" or msg.startswith(loc) or "." in msg.split(" ")[0] else f"{loc}: {msg}"
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = ".".join(str(p) for p in e["loc"][:-1])
        allowed = _allowed_keys(parent)
        where = f" in {parent}" if parent else ""
        return f"unknown key {loc!r}{where}; allowed keys: {', '.join(allowed)}"
    return f"{loc}: {msg} (got {e.get('input')!r})"


def _allowed_keys(parent: str) -> list[str]:
    model: Any = ExperimentConfig
    for part in [p for p in parent.split(".") if p]:
        field = model.model_fields[part] if hasattr(model, "model_fields") else None
        model = field.annotation if field is not None else None
        if model is None:
            return []
    if hasattr(model, "model_fields"):
        return list(model.model_fields)
    import dataclasses

    return [f.name for f in dataclasses.fields(model)] if dataclasses.is_dataclass(model) else []


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line saying what is wrong (a ReaderError has no ``problem`` and its text spans lines)."""
    return " ".join(str(getattr(e, "problem", None) or e).split())


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """``--set a.b=v`` pairs, values parsed as YAML."""
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        # Key parts are field names: no blanks or control characters (they would break the one-line errors).
        if not sep or any(not p or not p.isprintable() or any(c.isspace() for c in p) for p in key.split(".")):
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({_yaml_problem(e)})") from None
        out.append((key, value))
    return out


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config {p}: malformed YAML{where}: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {p}: not a UTF-8 text file") from None
    if data is None:
        raise ConfigError(f"config {p} is empty; expected a YAML mapping with keys such as method, model, data, train")
    if not isinstance(data, dict):
        raise ConfigError(f"config {p}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def validate(data: dict[str, Any]) -> Any:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Any:
    """Read YAML (or defaults when ``path`` is None), apply ``--set`` overrides, validate.

    Local relative paths are made absolute here, on the driver: Ray workers and Tune
    trials run in other working directories.
    """
    data = read_yaml(path) if path is not None else {}
    cfg = validate(apply_overrides(data, parse_set(overrides)))
    return resolve_paths(cfg)


def _abs(p: str | None) -> str | None:
    if p is None or "://" in p:
        return p
    return str(Path(p).expanduser().resolve())


def resolve_paths(cfg: Any) -> Any:
    for section, field in (("storage", "path"), ("data", "root"), ("train", "init_from")):
        obj = getattr(cfg, section)
        try:
            setattr(obj, field, _abs(getattr(obj, field)))
        except (ValueError, OSError) as e:  # e.g. an embedded NUL byte
            raise ConfigError(f"{section}.{field}: {getattr(obj, field)!r} is not a usable path ({e})") from None
    return cfg


def from_dict(data: dict[str, Any]) -> Any:
    """Parse a plain dict again inside a Ray worker (the Ray boundary carries dicts)."""
    return validate(dict(data))
