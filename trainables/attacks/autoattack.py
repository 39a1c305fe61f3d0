"""AutoAttack (Croce & Hein 2020) through the packaged original implementation, ``pyautoattack``.

The standard version runs APGD-CE, APGD-T (9 target classes), FAB-T and Square (5,000
queries) in sequence, each on the points the previous ones could not break. We run the
package's own ``run_standard_evaluation`` one attack at a time so that the robust count
after every attack is known exactly (the package only logs rounded percentages), which
the gradient-masking checks need: the package's own Square check fires when the
black-box Square breaks points that every white-box attack before it missed.

The package logs to the ``auto-attack`` logger and reseeds torch's global RNG; both are
contained here (its warnings are collected and returned, the caller's RNG is restored).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trainables.attacks.pgd import BNMode, bn_mode
from trainables.registry import ATTACKS

STANDARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
ALL_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
NORMS = ("Linf", "L2")


@dataclass
class AutoAttackResult:
    """Adversarial examples and exact robust counts after each attack (cumulative)."""

    x_adv: Tensor
    robust: Tensor  # per example: still classified correctly after every attack
    clean_correct: int
    counts_after: dict[str, int]  # attack name → robust count after it (cumulative, in run order)
    total: int
    warnings: list[str] = field(default_factory=list)

    @property
    def robust_count(self) -> int:
        return int(self.robust.sum())

    @property
    def square_gain(self) -> int:
        """Points Square (black-box) broke after every white-box attack before it had failed."""
        names = list(self.counts_after)
        if "square" not in names:
            return 0
        i = names.index("square")
        before = self.counts_after[names[i - 1]] if i > 0 else self.clean_correct
        return before - self.counts_after["square"]


def _kind(msg: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", msg)


def merge_warnings(into: list[str], new: Sequence[str]) -> list[str]:
    """``into`` plus the messages of ``new`` whose kind (numbers ignored) is not there yet."""
    kinds = {_kind(m) for m in into}
    out = list(into)
    for m in new:
        if _kind(m) not in kinds:
            kinds.add(_kind(m))
            out.append(m)
    return out


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # one message per kind: "there are 49 points with zero gradient" and "... 48 ..." are one check
        self.messages = merge_warnings(self.messages, [record.getMessage()])


@contextlib.contextmanager
def quiet_autoattack(device: torch.device) -> Iterator[_Collect]:
    """Silence pyautoattack (logger and stdout), collect its warnings, restore the caller's RNG."""
    logger = logging.getLogger("auto-attack")
    handler = _Collect()
    old_prop, old_level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    devices = [device.index or 0] if device.type == "cuda" else []
    # its dynamic-defence check ends with sys.settrace(None), which would switch off a
    # running coverage tracer or debugger: put the caller's tracer back afterwards
    tracer = sys.gettrace()
    try:
        with torch.random.fork_rng(devices=devices), contextlib.redirect_stdout(io.StringIO()):
            yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = old_prop, old_level
        sys.settrace(tracer)


def _reset_dynamic_check() -> None:
    # pyautoattack's dynamic-defence check counts traced calls in a module-global dict that
    # it never resets, so one earlier model with a backward in forward would flag every
    # later model; reset it so each evaluation judges only its own model.
    from pyautoattack import checks

    for k in checks.funcs:
        checks.funcs[k] = 0


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    norm: str = "Linf",
    version: str = "standard",
    attacks_to_run: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 250,
    square_queries: int | None = None,
    bn: BNMode = "eval",
) -> AutoAttackResult:
    """Run AutoAttack on (x, y). ``attacks_to_run`` (a subset, in order) implies version='custom'.

    ``square_queries`` overrides Square's query budget (5,000 in the standard version).
    """
    from pyautoattack import AutoAttack

    if norm not in NORMS:
        raise ValueError(f"autoattack norm must be one of {list(NORMS)}, got {norm!r}")
    if attacks_to_run is not None:
        bad = [a for a in attacks_to_run if a not in ALL_ATTACKS]
        if bad or not attacks_to_run:
            raise ValueError(f"autoattack attacks_to_run must be a non-empty subset of {list(ALL_ATTACKS)}, got {list(attacks_to_run)}")
        version = "custom"
    elif version not in ("standard", "plus"):
        raise ValueError(f"autoattack version must be 'standard' or 'plus' (or give attacks_to_run), got {version!r}")
    x = x.detach()
    device = x.device
    n = int(y.shape[0])
    with bn_mode(model, bn), quiet_autoattack(device) as log:
        _reset_dynamic_check()
        aa = AutoAttack(model, eps=float(eps), norm=norm, version="standard" if version == "custom" else version,
                        seed=int(seed), device=device)
        aa.verbose = False
        order = list(attacks_to_run) if attacks_to_run is not None else list(aa.attacks_to_run)
        if version == "custom":
            aa.version = "custom"
        if square_queries is not None:
            aa.square.n_queries = int(square_queries)
        with torch.no_grad():
            logits = model(x)
        robust = logits.argmax(1) == y
        # the standard version targets 9 classes; fewer classes leave fewer targets
        n_targets = min(9, int(logits.shape[1]) - 1)
        aa.apgd_targeted.n_target_classes = n_targets
        aa.fab.n_target_classes = n_targets
        clean_correct = int(robust.sum())
        x_adv = x.clone()
        counts_after: dict[str, int] = {}
        for name in order:
            idx = robust.nonzero().flatten()
            if idx.numel() > 0:
                aa.attacks_to_run = [name]
                adv, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                with torch.no_grad():
                    broken = model(adv).argmax(1) != y[idx]
                x_adv[idx[broken]] = adv[broken].to(x_adv.dtype)
                robust[idx[broken]] = False
            counts_after[name] = int(robust.sum())
    return AutoAttackResult(x_adv=x_adv, robust=robust, clean_correct=clean_correct, counts_after=counts_after,
                            total=n, warnings=list(log.messages))


def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    norm: str = "Linf",
    n_queries: int = 5000,
    seed: int = 0,
    batch_size: int = 250,
    bn: BNMode = "eval",
) -> AutoAttackResult:
    """Square alone (black-box, score-based): the gradient-masking check's black-box reference."""
    return autoattack(model, x, y, eps=eps, norm=norm, attacks_to_run=["square"], seed=seed,
                      batch_size=batch_size, square_queries=n_queries, bn=bn)


@ATTACKS.register("autoattack")
def autoattack_attack(eps: float = 8 / 255, norm: str = "Linf", version: str = "standard",
                      attacks_to_run: Sequence[str] | None = None, seed: int = 0, square_queries: int | None = None,
                      bn: BNMode = "eval"):
    """AutoAttack as a closure (model, x, y) → x_adv (unbroken examples come back clean)."""

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return autoattack(model, x, y, eps=eps, norm=norm, version=version, attacks_to_run=attacks_to_run,
                          seed=seed, batch_size=max(int(y.shape[0]), 1), square_queries=square_queries, bn=bn).x_adv

    return attack
