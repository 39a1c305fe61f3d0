"""Which figures an evaluation logs (``orchestrator.evaluate.eval_figures``)."""

from __future__ import annotations

from orchestrator.evaluate import eval_figures
from tests.conftest import digits_cfg
from trainables.evaluation import EvalResult


def _result(counts: dict[str, tuple[int, int]]) -> EvalResult:
    r = EvalResult(shards=[0], params={"eps": 0.1})
    for k, (c, n) in counts.items():
        r.add(k, c, n)
    return r


def test_pgd_steps_figure_needs_two_step_counts(tmp_path) -> None:
    cfg = digits_cfg(tmp_path)
    one = _result({"test/clean_acc": (90, 100), "test/pgd20_acc": (40, 100)})
    assert "accuracy_vs_pgd_steps" not in dict(eval_figures(one, cfg=cfg, state=None))
    three = _result({"test/clean_acc": (90, 100), "test/pgd20_acc": (40, 100), "test/pgd100_acc": (35, 100),
                     "test/pgd200_acc": (34, 100)})
    assert three.steps_curve() == [(20, 0.4), (100, 0.35), (200, 0.34)]
    fig = dict(eval_figures(three, cfg=cfg, state=None))["accuracy_vs_pgd_steps"]
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [20, 100, 200] and list(line.get_ydata()) == [0.4, 0.35, 0.34]
    assert "ε = 0.1" in fig.axes[0].get_title()
