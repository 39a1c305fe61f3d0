"""Gradient-masking checks (Athalye, Carlini & Wagner 2018; Carlini et al. 2019, "On evaluating
adversarial robustness"; Croce & Hein 2020's AutoAttack flags).

Label-smoothing and noise defences have a history of looking robust to PGD only because
their gradients are uninformative. A model is flagged (never silently) when:

- ``large_eps``: robust accuracy does not reach ≈ 0 at a large ε (an unbounded-enough
  attack must always win); the tolerance is at most half of chance (1/(2K)), so it can fire
  on ImageNet (K = 1000) too;
- ``square``: black-box Square beats the white-box attacks by more than a margin, in aggregate
  or per example (the fraction of examples Square breaks that white-box PGD left correct);
- ``transfer``: examples transferred from another model beat the white-box attacks (likewise);
- ``autoattack``: AutoAttack's own checks fired (Square broke points that APGD/FAB
  missed, zero gradients, randomness or a dynamic defence).

The checks are computed from *counts* so that shards evaluated separately can be summed
first and judged once (``masking_report``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trainables.attacks.autoattack import square
from trainables.attacks.cw import cw_linf
from trainables.attacks.pgd import BNMode, bn_mode, pgd_linf

WHITEBOX_KEYS: tuple[str, ...] = ("masking/whitebox_acc", "test/pgd20_acc", "test/pgd100_acc", "test/pgd200_acc",
                                  "test/cw_linf_acc")
# pyautoattack's own threshold for "Square decreased the robust accuracy" (checks.check_square_sr)
AUTOATTACK_SQUARE_ALPHA = 0.002


@dataclass
class MaskingReport:
    """Flags plus the numbers behind them; ``flagged`` is True when any check fired."""

    flags: dict[str, bool]
    numbers: dict[str, float]
    reasons: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return any(self.flags.values())

    def metrics(self) -> dict[str, float]:
        out = {f"masking/{k}_flag": float(v) for k, v in self.flags.items()}
        out["masking/flagged"] = float(self.flagged)
        out.update({f"masking/{k}": v for k, v in self.numbers.items()})
        return out

    def summary(self) -> str:
        if not self.flags:
            return "gradient-masking checks: not run"
        if not self.flagged:
            return "gradient-masking checks: passed (" + ", ".join(sorted(self.flags)) + ")"
        return "GRADIENT MASKING SUSPECTED — robustness numbers are not trustworthy:\n  - " + "\n  - ".join(self.reasons)


def whitebox_and_blackbox_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    large_eps: float,
    steps: int = 20,
    square_queries: int = 5000,
    source: nn.Module | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    bn: BNMode = "eval",
    whitebox_robust: Tensor | None = None,
) -> dict[str, int]:
    """Per-batch correct counts behind the checks (keys ``masking/*_acc``).

    White-box = robust to both PGD-CE and PGD on the C&W margin (per example), and to
    ``whitebox_robust`` if the caller already ran other white-box attacks at ε. Per example,
    ``masking/square_only_broken`` and ``masking/transfer_only_broken`` count the examples that
    Square (transfer) breaks although every white-box attack left them correct. Predictions
    are scored in eval mode whatever the caller's mode.
    """
    def robust_under(x_adv: Tensor, m: nn.Module = model) -> Tensor:
        with torch.no_grad(), bn_mode(m, "eval"):
            return m(x_adv).argmax(1) == y

    ss = 2.5 * eps / max(steps, 1)
    wb = robust_under(pgd_linf(model, x, y, eps=eps, step_size=ss, steps=steps, loss="ce", bn=bn, generator=generator))
    wb &= robust_under(cw_linf(model, x, y, eps=eps, step_size=ss, steps=steps, bn=bn, generator=generator))
    if whitebox_robust is not None:
        wb &= whitebox_robust.to(wb.device)
    big = robust_under(pgd_linf(model, x, y, eps=large_eps, step_size=2.5 * large_eps / max(steps, 1), steps=steps,
                                loss="ce", bn=bn, generator=generator))
    sq = square(model, x, y, eps=eps, n_queries=square_queries, seed=seed, bn=bn)
    sq_robust = sq.robust.to(wb.device)
    out = {
        "masking/whitebox_acc": int(wb.sum()),
        "masking/large_eps_acc": int(big.sum()),
        "masking/square_acc": sq.robust_count,
        "masking/square_only_broken": int((wb & ~sq_robust).sum()),
    }
    if source is not None:
        x_tr = pgd_linf(source, x, y, eps=eps, step_size=ss, steps=steps, loss="ce", bn="eval", generator=generator,
                        keep="last")
        tr = robust_under(x_tr)
        out["masking/transfer_acc"] = int(tr.sum())
        out["masking/transfer_only_broken"] = int((wb & ~tr).sum())
    return out


def masking_report(
    acc: Mapping[str, float],
    *,
    margin: float = 0.02,
    zero_tol: float = 0.05,
    large_eps: float | None = None,
    autoattack_warnings: Sequence[str] = (),
    num_classes: int | None = None,
) -> MaskingReport:
    """Judge the checks from accuracies (fractions) keyed by SPEC §5 / ``masking/*`` names.

    Only checks whose inputs are present are judged (and reported as flags). With
    ``num_classes`` K the large-ε tolerance is min(zero_tol, 1/(2K)).
    """
    if num_classes:
        zero_tol = min(zero_tol, 0.5 / num_classes)
    flags: dict[str, bool] = {}
    numbers: dict[str, float] = {}
    reasons: list[str] = []
    wb_vals = [acc[k] for k in WHITEBOX_KEYS if k in acc]
    whitebox = min(wb_vals) if wb_vals else None
    if whitebox is not None:
        numbers["whitebox_ref_acc"] = whitebox
    if "masking/large_eps_acc" in acc:
        v = acc["masking/large_eps_acc"]
        numbers["large_eps_acc"] = v
        flags["large_eps"] = v > zero_tol
        if flags["large_eps"]:
            at = f" at ε={large_eps:g}" if large_eps is not None else ""
            reasons.append(f"robust accuracy{at} is {v:.3f} > {zero_tol:g}: PGD cannot drive it to 0 even with a large budget")
    for name, keys, what in (("square", ("masking/square_acc",), "black-box Square"),
                             ("transfer", ("test/transfer_acc", "masking/transfer_acc"), "transfer from the source model")):
        vals = [acc[k] for k in keys if k in acc]
        if not vals or whitebox is None:
            continue
        v = min(vals)
        numbers[f"{name}_ref_acc"] = v
        flags[name] = v < whitebox - margin
        if flags[name]:
            reasons.append(f"{what}: accuracy {v:.3f} is below the white-box accuracy {whitebox:.3f} by more than {margin:g}")
        only = acc.get(f"masking/{name}_only_broken")
        if only is not None:
            numbers[f"{name}_only_broken"] = only
            if only > margin:
                flags[name] = True
                reasons.append(f"{what} broke {only:.3f} of the examples that every white-box attack left correct "
                               f"(per example; more than {margin:g})")
    if "masking/autoattack_square_gain" in acc or autoattack_warnings:
        gain = acc.get("masking/autoattack_square_gain", 0.0)
        flags["autoattack"] = gain > AUTOATTACK_SQUARE_ALPHA or bool(autoattack_warnings)
        if gain > AUTOATTACK_SQUARE_ALPHA:
            reasons.append(f"AutoAttack: Square broke {gain:.3f} of the examples after APGD and FAB had failed")
        reasons.extend(f"AutoAttack check: {w}" for w in autoattack_warnings)
    return MaskingReport(flags=flags, numbers=numbers, reasons=reasons)
