"""The paper's figures, as matplotlib Figures (Agg canvas, no pyplot state; the caller logs them).

- accuracy vs ε per attack (Table 2 / Fig. 6 style) and vs PGD steps (Fig. 7);
- loss landscape along sign(∇ₓL) × a Rademacher direction (Fig. 2, after Engstrom,
  Ilyas & Athalye 2018);
- β·βᵀ label-correlation heatmap with class names (Fig. 4);
- pairwise input-gradient cosine similarity between models (Table 11, after Kariyappa &
  Qureshi 2019);
- radar chart normalised by the best method per axis (Fig. 1);
- a sensitivity heatmap over a 2-D hyperparameter grid (Fig. 5).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from trainables.attacks.pgd import bn_mode


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever pyplot's backend is
    return fig


def plot_accuracy_vs_eps(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str = "Robust accuracy vs ε",
    xlabel: str = "ε (ℓ∞, pixels in [0,1])",
) -> Figure:
    """One line per attack (or model): ``curves[label] = [(ε, accuracy), …]``."""
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel="accuracy", title=title, ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    return fig


def plot_accuracy_vs_steps(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    *,
    eps: float | None = None,
    title: str | None = None,
) -> Figure:
    """Robust accuracy vs the number of PGD-ℓ∞ steps, one line per model (paper Fig. 7)."""
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    budget = f" (ε = {eps:g})" if eps is not None else ""
    ax.set(xlabel="PGD steps", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=title or f"Robust accuracy vs PGD-ℓ∞ steps{budget}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    return fig


@dataclass
class LandscapeGrid:
    """Mean cross-entropy at x + a·sign(∇ₓL) + b·r for a ∈ ``a``, b ∈ ``b`` (``loss[i, j]`` at a[i], b[j])."""

    a: np.ndarray
    b: np.ndarray
    loss: np.ndarray


def loss_landscape_grid(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radius: float,
    n: int = 21,
    seed: int = 0,
    symmetric: bool = True,
    clip: bool = True,
    chunk: int = 64,
) -> LandscapeGrid:
    """The loss surface of Engstrom et al. (2018): per example, d₁ = sign(∇ₓL(x, y)), d₂ a seeded
    Rademacher (±1) vector; the surface is the batch-mean loss over the grid (model in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with bn_mode(model, "eval"):
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
        d1 = grad.sign()
        d2 = (torch.randint(0, 2, x.shape, generator=gen).to(x.device, x.dtype) * 2 - 1)
        lo = -radius if symmetric else 0.0
        a = np.linspace(lo, radius, n)
        b = np.linspace(lo, radius, n)
        pairs = [(i, j) for i in range(n) for j in range(n)]
        loss = np.zeros((n, n))
        with torch.no_grad():
            # several grid points per forward pass: stack (points × batch) images
            per = max(chunk // max(x.shape[0], 1), 1)
            for s in range(0, len(pairs), per):
                group = pairs[s:s + per]
                xs = torch.cat([x + float(a[i]) * d1 + float(b[j]) * d2 for i, j in group])
                if clip:
                    xs = xs.clamp(0.0, 1.0)
                ce = F.cross_entropy(model(xs), y.repeat(len(group)), reduction="none").view(len(group), -1).mean(1)
                for (i, j), v in zip(group, ce.tolist()):
                    loss[i, j] = v
    return LandscapeGrid(a=a, b=b, loss=loss)


def plot_loss_landscape(
    grids: Mapping[str, LandscapeGrid] | LandscapeGrid,
    *,
    title: str = "Loss landscape",
) -> Figure:
    """3-D loss surfaces, one panel per model (paper Fig. 2); shared z-range so panels compare."""
    if isinstance(grids, LandscapeGrid):
        grids = {"": grids}
    k = max(len(grids), 1)
    fig = _figure((4.2 * k, 4))
    zmax = max((float(g.loss.max()) for g in grids.values()), default=1.0)
    for idx, (label, g) in enumerate(grids.items()):
        ax = fig.add_subplot(1, k, idx + 1, projection="3d")
        A, B = np.meshgrid(g.a, g.b, indexing="ij")
        ax.plot_surface(A, B, g.loss, cmap="viridis", linewidth=0, antialiased=True)
        ax.set(xlabel="sign(∇ₓL)", ylabel="Rademacher", zlabel="loss", zlim=(0, zmax), title=label)
    fig.suptitle(title)
    return fig


def plot_label_correlation(
    beta: Tensor | np.ndarray | Sequence[float],
    class_names: Sequence[str] | None = None,
    *,
    title: str = "Label correlation β·βᵀ",
) -> Figure:
    """Heatmap of the outer product β·βᵀ of SPROUT's learned Dirichlet parameter (paper Fig. 4)."""
    b = np.asarray(beta.detach().cpu() if isinstance(beta, Tensor) else beta, dtype=float).reshape(-1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(b.size)]
    if len(names) != b.size:
        raise ValueError(f"got {len(names)} class names for a β of {b.size} classes")
    m = np.outer(b, b)
    k = b.size
    fig = _figure((max(4.0, 0.45 * k + 2), max(3.5, 0.45 * k + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(k), names)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return fig


def input_gradient_cosine(models: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> tuple[list[str], np.ndarray]:
    """Mean over examples of the cosine similarity between two models' input gradients ∇ₓCE (Table 11)."""
    names = list(models)
    grads = []
    for name in names:
        m = models[name]
        with bn_mode(m, "eval"):
            xg = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(m(xg), y, reduction="sum"), xg)
        grads.append(g.flatten(1))
    k = len(names)
    sim = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            c = F.cosine_similarity(grads[i], grads[j], dim=1, eps=1e-12).mean().item()
            sim[i, j] = sim[j, i] = c
    return names, sim


def plot_gradient_similarity(
    names: Sequence[str],
    matrix: np.ndarray,
    *,
    title: str = "Input-gradient cosine similarity",
) -> Figure:
    """Annotated heatmap of pairwise input-gradient cosine similarities (paper Table 11)."""
    m = np.asarray(matrix, dtype=float)
    k = len(names)
    fig = _figure((max(4.0, 0.9 * k + 2), max(3.5, 0.9 * k + 1)))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(k), list(names), rotation=30, ha="right")
    ax.set_yticks(range(k), list(names))
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return fig


def radar_scores(
    scores: Mapping[str, Mapping[str, float]],
    lower_is_better: Collection[str] = (),
) -> dict[str, dict[str, float]]:
    """Normalise each axis by the best method: value/best (higher-better) or best/value (lower-better,
    e.g. training time), so the best method scores 1 on every axis."""
    methods = list(scores)
    axes = list(dict.fromkeys(a for m in methods for a in scores[m]))
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    for a in axes:
        vals = {m: float(scores[m][a]) for m in methods if a in scores[m]}
        if a in lower_is_better:
            best = min(vals.values())
            for m, v in vals.items():
                out[m][a] = best / v if v > 0 else 1.0
        else:
            best = max(vals.values())
            for m, v in vals.items():
                out[m][a] = v / best if best > 0 else 0.0
    return out


def plot_radar(
    scores: Mapping[str, Mapping[str, float]],
    *,
    lower_is_better: Collection[str] = (),
    title: str = "Methods compared (normalised by the best per axis)",
) -> Figure:
    """Multi-dimensional radar chart (paper Fig. 1): one polygon per method over the axes."""
    norm = radar_scores(scores, lower_is_better)
    axes = list(dict.fromkeys(a for m in norm for a in norm[m]))
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False).tolist()
    fig = _figure((6, 6))
    ax = fig.add_subplot(projection="polar")
    for method, vals in norm.items():
        v = [vals.get(a, 0.0) for a in axes]
        ax.plot(angles + angles[:1], v + v[:1], marker="o", label=method)
        ax.fill(angles + angles[:1], v + v[:1], alpha=0.1)
    ax.set_xticks(angles, [f"{a}{' (↓)' if a in lower_is_better else ''}" for a in axes])
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    if norm:
        ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1))
    return fig


def plot_sensitivity(
    values: np.ndarray | Sequence[Sequence[float]],
    row_values: Sequence[float | str],
    col_values: Sequence[float | str],
    *,
    row_label: str = "α (Dirichlet)",
    col_label: str = "a (Mixup Beta)",
    title: str = "Robust accuracy sensitivity",
    fmt: str = ".3f",
) -> Figure:
    """Annotated heatmap of a metric over a 2-D hyperparameter grid (paper Fig. 5)."""
    v = np.asarray(values, dtype=float)
    if v.shape != (len(row_values), len(col_values)):
        raise ValueError(f"values have shape {v.shape}, expected ({len(row_values)}, {len(col_values)})")
    fig = _figure((max(4.0, 0.9 * len(col_values) + 2), max(3.5, 0.7 * len(row_values) + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(v, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(col_values)), [str(c) for c in col_values])
    ax.set_yticks(range(len(row_values)), [str(r) for r in row_values])
    ax.set(xlabel=col_label, ylabel=row_label, title=title)
    finite = v[np.isfinite(v)]
    mid = float(finite.mean()) if finite.size else 0.0
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            ax.text(j, i, format(v[i, j], fmt), ha="center", va="center", fontsize=8,
                    color="black" if v[i, j] > mid else "white")
    fig.colorbar(im, ax=ax)
    return fig
