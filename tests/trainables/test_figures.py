"""The paper's figures: each returns a matplotlib Figure that renders to PNG; the numbers behind
them (loss landscape, gradient similarity, radar normalisation) are checked directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from trainables import MODELS
from trainables.figures import (
    input_gradient_cosine,
    loss_landscape_grid,
    plot_accuracy_vs_eps,
    plot_accuracy_vs_steps,
    plot_gradient_similarity,
    plot_label_correlation,
    plot_loss_landscape,
    plot_radar,
    plot_sensitivity,
    radar_scores,
)


def _png(fig: Figure, tmp_path, name: str) -> None:
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cnn(seed: int):
    torch.manual_seed(seed)
    return MODELS["small_cnn"](num_classes=10, in_channels=1, mean=(0.305,), std=(0.375,), width=8).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def test_accuracy_curves(tmp_path):
    _png(plot_accuracy_vs_eps({"pgd20": [(0.0, 0.98), (0.1, 0.6), (0.3, 0.0)], "cw_linf": [(0.0, 0.98), (0.1, 0.55)]}),
         tmp_path, "eps")
    _png(plot_accuracy_vs_steps({"natural": [(10, 0.1), (100, 0.05)], "sprout": [(10, 0.6), (100, 0.55)]}, eps=0.03),
         tmp_path, "steps")


def test_loss_landscape_grid_and_plot(batch, tmp_path):
    model = _cnn(0)
    x, y = batch
    g = loss_landscape_grid(model, x, y, radius=0.1, n=5, seed=0)
    assert g.loss.shape == (5, 5) and np.all(np.isfinite(g.loss))
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
    assert g.loss[2, 2] == pytest.approx(clean, rel=1e-5)  # the grid centre is the clean input
    g2 = loss_landscape_grid(model, x, y, radius=0.1, n=5, seed=0, chunk=1)  # chunking changes nothing
    assert np.allclose(g.loss, g2.loss, rtol=1e-5)
    _png(plot_loss_landscape({"natural": g, "other": g2}), tmp_path, "landscape")


def test_label_correlation_heatmap(tmp_path):
    fig = plot_label_correlation(torch.tensor([0.5, 1.0, 2.0]), ["cat", "dog", "ship"])
    _png(fig, tmp_path, "beta")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["cat", "dog", "ship"]
    assert np.allclose(fig.axes[0].images[0].get_array(), np.outer([0.5, 1, 2], [0.5, 1, 2]))
    with pytest.raises(ValueError, match="class names"):
        plot_label_correlation([1.0, 2.0], ["a"])


def test_input_gradient_cosine(batch, tmp_path):
    x, y = batch
    a, b = _cnn(0), _cnn(1)
    names, sim = input_gradient_cosine({"a": a, "a_again": a, "b": b}, x, y)
    assert names == ["a", "a_again", "b"]
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0)
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 2] < 0.99
    _png(plot_gradient_similarity(names, sim), tmp_path, "cos")


def test_radar_is_normalised_by_the_best_method(tmp_path):
    scores = {"natural": {"clean": 0.96, "pgd": 0.0, "time_s": 146.7},
              "sprout": {"clean": 0.90, "pgd": 0.59, "time_s": 271.7},
              "pgd_at": {"clean": 0.85, "pgd": 0.36, "time_s": 1327.1}}
    norm = radar_scores(scores, lower_is_better={"time_s"})
    assert norm["natural"]["clean"] == 1.0 and norm["sprout"]["pgd"] == 1.0 and norm["natural"]["time_s"] == 1.0
    assert norm["pgd_at"]["time_s"] == pytest.approx(146.7 / 1327.1)
    assert norm["sprout"]["clean"] == pytest.approx(0.90 / 0.96)
    _png(plot_radar(scores, lower_is_better={"time_s"}), tmp_path, "radar")


def test_sensitivity_heatmap(tmp_path):
    fig = plot_sensitivity([[0.5, 0.6, 0.55], [0.4, 0.45, 0.3]], [0.01, 0.1], [0.1, 0.2, 0.5])
    _png(fig, tmp_path, "sens")
    assert len(fig.axes[0].texts) == 6
    with pytest.raises(ValueError, match="shape"):
        plot_sensitivity([[1.0, 2.0]], [0.1, 0.2], [1, 2])
