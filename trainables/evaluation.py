"""The robustness evaluation suite (SPEC §3; the paper's Tables 2–5, 10 and Figs. 6–7).

``run_suite(model, data, attacks, config)`` scores a model on clean inputs and under the
SPEC's attacks (``pgd20``, ``pgd100``, ``pgd200``, ``cw_linf``, ``cw_l2``, ``autoattack``,
``transfer``, ``invariance``, ``targeted``, ``masking_checks``) and returns *counts*
(correct, total) per metric, never means: shards evaluated on different workers are
summed exactly with ``EvalResult.merge`` (or ``sum(...)``) and turned into the SPEC §5
``test/*`` fractions by ``EvalResult.metrics()``.

Exactness across shards: the selected examples are cut into fixed blocks of
``batch_size`` and shard i of n takes blocks i, i+n, i+2n, …; every attack's randomness is
seeded from (seed, block, attack). A block is therefore computed identically whether
it is evaluated alone or in the unsharded run, so shard counts add up to the unsharded
counts exactly (on the same device).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from trainables.attacks.autoattack import autoattack, merge_warnings
from trainables.attacks.cw import cw_l2, cw_linf
from trainables.attacks.invariance import INVARIANCE_NAMES, invariance_correct
from trainables.attacks.masking import MaskingReport, masking_report, whitebox_and_blackbox_correct
from trainables.attacks.pgd import BNMode, bn_mode, pgd_linf
from trainables.attacks.targeted import IMAGENET_EPS, random_wrong_targets
from trainables.loop import derived_seed

SUITE_ATTACKS: tuple[str, ...] = ("pgd20", "pgd100", "pgd200", "cw_linf", "cw_l2", "autoattack", "transfer",
                                  "invariance", "targeted", "masking_checks")
PGD_STEPS = {"pgd20": 20, "pgd100": 100, "pgd200": 200}
StepRule = Literal["2.5eps/steps", "eps/5"]

Data = Dataset | tuple[Tensor, Tensor]


@dataclass
class EvalConfig:
    """Budgets and knobs of the suite. ε is in pixel units of [0,1] images."""

    eps: float = 8 / 255
    # PGD step size: SPEC's default 2.5·ε/steps, or the paper's ε/5; an explicit value wins
    pgd_step_rule: StepRule = "2.5eps/steps"
    pgd_step_size: float | None = None
    pgd_restarts: int = 1
    cw_linf_steps: int = 20
    cw_l2_budgets: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)  # test/cw_l2_acc is at the first (paper: 0.05)
    cw_l2_search_steps: int = 10
    cw_l2_max_iter: int = 1000
    cw_l2_lr: float = 0.01
    cw_l2_initial_const: float = 1e-3
    autoattack_version: str = "standard"
    autoattack_attacks: tuple[str, ...] | None = None  # a subset implies the custom version
    autoattack_norm: str = "Linf"
    autoattack_eps: float | None = None  # None: eps
    autoattack_square_queries: int | None = None  # None: the version's own (5,000 in standard)
    transfer_steps: int = 20
    invariance: tuple[str, ...] = INVARIANCE_NAMES
    targeted_eps: tuple[float, ...] = IMAGENET_EPS
    targeted_steps: int = 20
    # extra ε values for accuracy-vs-ε curves of pgd20 / cw_linf (keys test/<attack>_acc_eps<ε>)
    curve_eps: tuple[float, ...] = ()
    masking_large_eps: float = 0.5
    masking_square_queries: int = 5000
    masking_margin: float = 0.02
    masking_zero_tol: float = 0.05
    n_examples: int | None = None
    seed: int = 0
    batch_size: int = 256
    bn: BNMode = "eval"
    progress: bool = False

    def __post_init__(self) -> None:
        checks = {
            "eps": self.eps >= 0, "pgd_restarts": self.pgd_restarts >= 1, "cw_linf_steps": self.cw_linf_steps >= 1,
            "cw_l2_search_steps": self.cw_l2_search_steps >= 1, "cw_l2_max_iter": self.cw_l2_max_iter >= 0,
            "cw_l2_budgets": len(self.cw_l2_budgets) > 0 and all(b >= 0 for b in self.cw_l2_budgets),
            "batch_size": self.batch_size >= 1, "masking_large_eps": self.masking_large_eps > 0,
            "n_examples": self.n_examples is None or self.n_examples >= 1,
            "pgd_step_rule": self.pgd_step_rule in ("2.5eps/steps", "eps/5"),
            "targeted_eps": all(e >= 0 for e in self.targeted_eps),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid eval config field(s) {bad}: {({k: getattr(self, k) for k in bad})}")
        unknown = [n for n in self.invariance if n not in INVARIANCE_NAMES]
        if unknown:
            raise ValueError(f"eval invariance must be a subset of {list(INVARIANCE_NAMES)}, got {unknown}")

    def step_size(self, eps: float, steps: int) -> float:
        if self.pgd_step_size is not None:
            return self.pgd_step_size
        return eps / 5 if self.pgd_step_rule == "eps/5" else 2.5 * eps / max(steps, 1)

    def fingerprint(self) -> str:
        """What must agree for two shard results to be merged."""
        d = asdict(self)
        d.pop("progress")
        return repr(sorted(d.items()))


def _key_eps(prefix: str, e: float) -> str:
    return f"{prefix}{e:g}"


@dataclass
class EvalResult:
    """Exact counts of one (sharded) evaluation: ``counts[name] = [correct, total]``."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    shards: list[int] = field(default_factory=list)
    num_shards: int = 1
    config: str = ""
    params: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, correct: int, total: int) -> None:
        c = self.counts.setdefault(name, [0, 0])
        c[0] += int(correct)
        c[1] += int(total)

    def merge(self, other: EvalResult) -> EvalResult:
        """Sum two shard results (same config, disjoint shards)."""
        if self.config and other.config and self.config != other.config:
            raise ValueError("cannot merge evaluation results computed with different configs")
        if self.num_shards != other.num_shards and self.shards and other.shards:
            raise ValueError(f"cannot merge results of {self.num_shards}- and {other.num_shards}-way shardings")
        overlap = set(self.shards) & set(other.shards)
        if overlap:
            raise ValueError(f"shard(s) {sorted(overlap)} would be counted twice")
        out = EvalResult(counts={k: list(v) for k, v in self.counts.items()}, warnings=list(self.warnings),
                         seconds=dict(self.seconds), shards=sorted(self.shards + other.shards),
                         num_shards=max(self.num_shards, other.num_shards), config=self.config or other.config,
                         params=self.params or other.params)
        for k, (c, n) in other.counts.items():
            out.add(k, c, n)
        out.warnings = merge_warnings(out.warnings, other.warnings)
        for k, s in other.seconds.items():
            out.seconds[k] = out.seconds.get(k, 0.0) + s
        return out

    def __add__(self, other: EvalResult) -> EvalResult:
        return self.merge(other)

    def __radd__(self, other: Any) -> EvalResult:
        # sum(results) starts from 0
        if other == 0:
            return self
        return NotImplemented

    @property
    def complete(self) -> bool:
        return sorted(self.shards) == list(range(self.num_shards))

    def accuracies(self) -> dict[str, float]:
        return {k: c / n for k, (c, n) in sorted(self.counts.items()) if n > 0}

    def masking(self) -> MaskingReport:
        """The gradient-masking checks judged on the (merged) counts."""
        acc = self.accuracies()
        return masking_report(acc, margin=self.params.get("masking_margin", 0.02),
                              zero_tol=self.params.get("masking_zero_tol", 0.05),
                              large_eps=self.params.get("masking_large_eps"),
                              autoattack_warnings=self.warnings,
                              num_classes=int(self.params["num_classes"]) if self.params.get("num_classes") else None)

    def metrics(self) -> dict[str, float]:
        """SPEC §5 names (``test/clean_acc``, ``test/pgd20_acc``, …), masking flags, eval times."""
        out = self.accuracies()
        report = self.masking()
        if report.flags:
            out.update(report.metrics())
        out.update({f"time/eval_{k}_s": v for k, v in sorted(self.seconds.items())})
        return out

    def tags(self) -> dict[str, str]:
        """MLflow-style tags: ``gradient_masking`` = flagged | passed | not_run, and the reasons."""
        report = self.masking()
        status = "not_run" if not report.flags else ("flagged" if report.flagged else "passed")
        tags = {"gradient_masking": status}
        if report.reasons:
            tags["gradient_masking_reasons"] = "; ".join(report.reasons)[:4000]
        return tags

    def curve(self, attack: str) -> list[tuple[float, float]]:
        """(ε, accuracy) points of ``attack`` (``pgd20`` or ``cw_linf``), sorted by ε."""
        prefix = f"test/{attack}_acc_eps"
        pts = [(float(k[len(prefix):]), c / n) for k, (c, n) in self.counts.items() if k.startswith(prefix) and n > 0]
        if f"test/{attack}_acc" in self.counts and "eps" in self.params:
            c, n = self.counts[f"test/{attack}_acc"]
            pts.append((self.params["eps"], c / n))
        return sorted(set(pts))

    def steps_curve(self) -> list[tuple[int, float]]:
        """(PGD steps, accuracy) at the evaluation ε from ``pgd20``/``pgd100``/``pgd200`` (paper Fig. 7).

        Accuracy that keeps falling with more steps means the shorter attack under-estimated
        the threat (too few iterations, or masked gradients); a plateau is the honest figure.
        """
        pts = []
        for k, (c, n) in self.counts.items():
            steps = k.removeprefix("test/pgd").removesuffix("_acc")
            if k.startswith("test/pgd") and k.endswith("_acc") and steps.isdigit() and n > 0:
                pts.append((int(steps), c / n))
        return sorted(pts)

    def summary(self) -> str:
        """A printable table; a flagged model is marked, never hidden."""
        lines = [f"{'metric':<36} {'accuracy':>9} {'correct':>8} {'total':>7}"]
        for k, (c, n) in sorted(self.counts.items()):
            if n:
                lines.append(f"{k:<36} {c / n:>9.4f} {c:>8d} {n:>7d}")
        if not self.complete:
            lines.append(f"(partial: shards {self.shards} of {self.num_shards})")
        report = self.masking()
        if report.flags:
            lines.append(report.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(**d)


def example_indices(n_total: int, n_examples: int | None, seed: int) -> np.ndarray:
    """The evaluated examples: all of them, or a seeded subset of ``n_examples`` (sorted)."""
    if n_examples is None or n_examples >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n_examples])


def shard_blocks(n: int, batch_size: int, shard: int = 0, num_shards: int = 1) -> list[tuple[int, int, int]]:
    """(block id, start, end) positions of shard ``shard`` of ``num_shards`` (round-robin blocks)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards), got shard={shard}, num_shards={num_shards}")
    n_blocks = math.ceil(n / batch_size)
    return [(b, b * batch_size, min((b + 1) * batch_size, n)) for b in range(shard, n_blocks, num_shards)]


class _Fetch:
    """Rows of a dataset or an (x, y) pair by index, without a DataLoader."""

    def __init__(self, data: Data) -> None:
        if isinstance(data, tuple):
            self.x, self.y = data
            self.n = int(self.y.shape[0])
        elif hasattr(data, "tensors"):
            self.x, self.y = data.tensors()  # type: ignore[union-attr]
            self.n = int(self.y.shape[0])
        else:
            self.x = self.y = None
            self.data = data
            self.n = len(data)  # type: ignore[arg-type]

    def __call__(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.x is not None and self.y is not None:
            t = torch.as_tensor(idx, dtype=torch.long)
            return self.x[t].float(), self.y[t].long()
        items = [self.data[int(i)] for i in idx]
        return torch.stack([torch.as_tensor(a) for a, _ in items]).float(), torch.as_tensor([int(b) for _, b in items])


def _generator(seed: int, block: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, block, zlib.crc32(name.encode())))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False, dynamic_ncols=True)


def run_suite(
    model: nn.Module,
    data: Data,
    attacks: Sequence[str],
    config: EvalConfig | None = None,
    *,
    source_model: nn.Module | None = None,
    shard: int = 0,
    num_shards: int = 1,
    device: str | torch.device | None = None,
    on_block: Callable[[int, int], None] | None = None,
    on_attack: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` (images in [0,1] → logits) on shard ``shard`` of ``num_shards``.

    ``data``: a Dataset of (image, label) or an (x, y) tensor pair. ``attacks``: SPEC names
    (clean accuracy is always included; ``"clean"`` is accepted and ignored).
    ``source_model``: the transfer attack's source (required by ``transfer``; also used by
    ``masking_checks`` when given). ``on_block(done, total)`` reports progress (e.g. to Ray);
    ``on_attack(name, done, total)`` each attack's blocks done (``"clean"`` included).
    """
    cfg = config or EvalConfig()
    names = [a for a in dict.fromkeys(attacks) if a != "clean"]
    unknown = [a for a in names if a not in SUITE_ATTACKS]
    if unknown:
        raise ValueError(f"unknown eval attack(s) {unknown}; expected some of {['clean', *SUITE_ATTACKS]}")
    if "transfer" in names and source_model is None:
        raise ValueError("eval attack 'transfer' needs a source model (by default the comparison's natural model)")
    dev = torch.device(device) if device is not None else _device_of(model)
    model.to(dev)
    if source_model is not None:
        source_model.to(dev)
    fetch = _Fetch(data)
    idx = example_indices(fetch.n, cfg.n_examples, cfg.seed)
    blocks = shard_blocks(len(idx), cfg.batch_size, shard, num_shards)
    result = EvalResult(shards=[shard], num_shards=num_shards, config=cfg.fingerprint(),
                        params={"eps": cfg.eps, "masking_margin": cfg.masking_margin,
                                "masking_zero_tol": cfg.masking_zero_tol, "masking_large_eps": cfg.masking_large_eps})
    bar = _progress(len(blocks) * (len(names) + 1), cfg.progress, f"eval shard {shard}/{num_shards}")
    try:
        for done, (block, start, end) in enumerate(blocks):
            x, y = fetch(idx[start:end])
            if "num_classes" not in result.params:  # K, for the masking checks' large-ε tolerance
                with bn_mode(model, "eval"):
                    result.params["num_classes"] = _num_classes(model, x.to(dev))
            for name, seconds in _run_block(model, x.to(dev), y.to(dev), block, names, cfg, source_model, result, bar):
                result.seconds[name] = result.seconds.get(name, 0.0) + seconds
                if on_attack is not None:
                    on_attack(name, done + 1, len(blocks))
            if on_block is not None:
                on_block(done + 1, len(blocks))
    finally:
        bar.close()
    return result


def _run_block(
    model: nn.Module, x: Tensor, y: Tensor, block: int, names: list[str], cfg: EvalConfig,
    source: nn.Module | None, result: EvalResult, bar: Any,
) -> Iterator[tuple[str, float]]:
    """Run every requested attack on one block, adding counts to ``result``; yields timings."""
    n = int(y.shape[0])
    robust: dict[str, Tensor] = {}  # per-example white-box robustness at ε, reused by the masking checks

    def correct(x_adv: Tensor, m: nn.Module = model) -> Tensor:
        with torch.no_grad(), bn_mode(m, "eval"):
            return m(x_adv).argmax(1) == y

    def pgd(eps: float, steps: int, loss: str, tag: str, restarts: int = cfg.pgd_restarts) -> Tensor:
        gen = _generator(cfg.seed, block, tag)
        if loss == "cw":
            return cw_linf(model, x, y, eps=eps, step_size=cfg.step_size(eps, steps), steps=steps, restarts=restarts,
                           bn=cfg.bn, generator=gen)
        return pgd_linf(model, x, y, eps=eps, step_size=cfg.step_size(eps, steps), steps=steps, restarts=restarts,
                        loss="ce", bn=cfg.bn, generator=gen)

    t0 = time.perf_counter()
    result.add("test/clean_acc", int(correct(x).sum()), n)
    bar.update(1)
    yield "clean", time.perf_counter() - t0

    for name in names:
        t0 = time.perf_counter()
        bar.set_postfix_str(name)
        if name in PGD_STEPS or name == "cw_linf":
            steps = PGD_STEPS.get(name, cfg.cw_linf_steps)
            loss = "cw" if name == "cw_linf" else "ce"
            robust[name] = correct(pgd(cfg.eps, steps, loss, name))
            result.add(f"test/{name}_acc", int(robust[name].sum()), n)
            if name in ("pgd20", "cw_linf"):
                for e in cfg.curve_eps:
                    result.add(_key_eps(f"test/{name}_acc_eps", e), int(correct(pgd(e, steps, loss, f"{name}@{e:g}")).sum()), n)
        elif name == "cw_l2":
            res = cw_l2(model, x, y, search_steps=cfg.cw_l2_search_steps, max_iter=cfg.cw_l2_max_iter, lr=cfg.cw_l2_lr,
                        initial_const=cfg.cw_l2_initial_const, bn=cfg.bn)
            counts = res.correct_at(cfg.cw_l2_budgets)
            result.add("test/cw_l2_acc", counts[float(cfg.cw_l2_budgets[0])], n)
            for b, c in counts.items():
                result.add(_key_eps("test/cw_l2_acc_l2_", b), c, n)
        elif name == "autoattack":
            aa = autoattack(model, x, y, eps=cfg.autoattack_eps if cfg.autoattack_eps is not None else cfg.eps,
                            norm=cfg.autoattack_norm, version=cfg.autoattack_version,
                            attacks_to_run=list(cfg.autoattack_attacks) if cfg.autoattack_attacks else None,
                            seed=derived_seed(cfg.seed, block), batch_size=max(n, 1),
                            square_queries=cfg.autoattack_square_queries, bn=cfg.bn)
            result.add("test/autoattack_acc", aa.robust_count, n)
            for a, c in aa.counts_after.items():
                result.add(f"test/autoattack_{a.replace('-', '_')}_acc", c, n)
            if "square" in aa.counts_after:
                result.add("masking/autoattack_square_gain", aa.square_gain, n)
            result.warnings = merge_warnings(result.warnings, aa.warnings)
        elif name == "transfer":
            assert source is not None
            x_tr = pgd_linf(source, x, y, eps=cfg.eps, step_size=cfg.step_size(cfg.eps, cfg.transfer_steps),
                            steps=cfg.transfer_steps, restarts=cfg.pgd_restarts, loss="ce", bn=cfg.bn,
                            generator=_generator(cfg.seed, block, name), keep="last")
            robust[name] = correct(x_tr)
            result.add("test/transfer_acc", int(robust[name].sum()), n)
        elif name == "invariance":
            with bn_mode(model, "eval"):
                for t, c in invariance_correct(model, x, y, tuple(cfg.invariance)).items():
                    result.add(f"test/{t}_acc", c, n)
        elif name == "targeted":
            k = _num_classes(model, x)
            targets = random_wrong_targets(y, k, _generator(cfg.seed, block, name))
            for e in cfg.targeted_eps:
                x_adv = pgd_linf(model, x, targets, eps=e, step_size=cfg.step_size(e, cfg.targeted_steps),
                                 steps=cfg.targeted_steps, restarts=cfg.pgd_restarts, loss="ce", targeted=True,
                                 bn=cfg.bn, generator=_generator(cfg.seed, block, f"{name}@{e:g}"), true_labels=y)
                result.add(_key_eps("test/targeted_acc_eps", e), int(correct(x_adv).sum()), n)
        elif name == "masking_checks":
            wb = [robust[a] for a in ("pgd20", "pgd100", "pgd200", "cw_linf") if a in robust]
            prior = torch.stack(wb).all(0) if wb else None
            counts = whitebox_and_blackbox_correct(
                model, x, y, eps=cfg.eps, large_eps=cfg.masking_large_eps, steps=20,
                square_queries=cfg.masking_square_queries, source=source, seed=derived_seed(cfg.seed, block),
                generator=_generator(cfg.seed, block, name), bn=cfg.bn, whitebox_robust=prior)
            for k, c in counts.items():
                result.add(k, c, n)
        bar.update(1)
        yield name, time.perf_counter() - t0


def eps_curve(
    model: nn.Module, data: Data, eps_values: Sequence[float], *, attack: str = "pgd20", config: EvalConfig | None = None,
) -> list[tuple[float, float]]:
    """Accuracy vs ε for ``pgd20``/``pgd100``/``pgd200``/``cw_linf`` (each ε seeded like the suite)."""
    if attack not in (*PGD_STEPS, "cw_linf"):
        raise ValueError(f"eps_curve attack must be one of {[*PGD_STEPS, 'cw_linf']}, got {attack!r}")
    base = config or EvalConfig()
    out = []
    for e in eps_values:
        cfg = EvalConfig(**{**asdict(base), "eps": float(e), "curve_eps": ()})
        c, n = run_suite(model, data, [attack], cfg).counts[f"test/{attack}_acc"]
        out.append((float(e), c / n))
    return out


def steps_curve(
    model: nn.Module, data: Data, steps_values: Sequence[int], *, eps: float | None = None, config: EvalConfig | None = None,
) -> list[tuple[int, float]]:
    """Accuracy vs number of PGD-ℓ∞ steps (the paper's Fig. 7), step size per the config's rule."""
    cfg = config or EvalConfig()
    eps = cfg.eps if eps is None else eps
    fetch = _Fetch(data)
    dev = _device_of(model)
    idx = example_indices(fetch.n, cfg.n_examples, cfg.seed)
    out = []
    for steps in steps_values:
        correct = total = 0
        for block, start, end in shard_blocks(len(idx), cfg.batch_size):
            x, y = fetch(idx[start:end])
            x, y = x.to(dev), y.to(dev)
            x_adv = pgd_linf(model, x, y, eps=eps, step_size=cfg.step_size(eps, steps), steps=int(steps),
                             restarts=cfg.pgd_restarts, bn=cfg.bn, generator=_generator(cfg.seed, block, f"steps{steps}"))
            with torch.no_grad(), bn_mode(model, "eval"):
                correct += int((model(x_adv).argmax(1) == y).sum())
            total += int(y.shape[0])
        out.append((int(steps), correct / max(total, 1)))
    return out
