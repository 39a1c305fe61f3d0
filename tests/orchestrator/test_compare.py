"""``sprout compare`` on digits: `make demo`'s own command, its report and console output, and
its MLflow UI in a real browser (issues 5 and 15)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from benchmarks.demo_time import check_output
from orchestrator import tracking
from orchestrator.compare import DEFAULT_METHODS, parse_methods, variant_overrides
from orchestrator.config import ConfigError, load_config
from tests.conftest import DIGITS
from tests.services import MLFLOW_SERVER_ENV

METHODS = sorted(DEFAULT_METHODS)
DEMO_EXAMPLES = 40  # test examples per model (the demo evaluates 100; the lines do not depend on it)
DEMO_MAX_LINES = 62  # the log path + 4 methods x 8 epochs + 4 models x 5 attacks + table (6) + 3
HANG_GUARD_S = 1800  # only a guard against hangs (under `make test` another lane shares the CPUs)


def test_method_list_parsing_and_ablations() -> None:
    assert parse_methods(None) == ["natural", "pgd_at", "trades", "sprout"]
    assert variant_overrides("sprout_ga") == {"method": "sprout", "sprout.use_mixup": False,
                                              "sprout.use_dirichlet": False}
    with pytest.raises(ConfigError, match="unknown method 'madry'"):
        parse_methods("natural,madry")


class Demo(NamedTuple):
    cfg: Any
    out: dict[str, str]  # {"parent_run_id": ...}
    tmp: Path  # the working directory: ./mlflow.db, ./ray_results
    uri: str
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Demo:
    """`make demo`'s own command (`sprout compare configs/digits.yaml`: four methods, 8 epochs,
    five attacks with AutoAttack) as a user runs it: a subprocess with its own Ray, in a fresh
    working directory holding its ./mlflow.db; 40 test examples per model instead of 100 so
    that CI can afford it. The report, UI and console-output tests below share it."""
    import ray

    ray.shutdown()  # one Ray instance at a time: the demo starts its own
    tmp = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SPROUT_DEBUG_DIR")}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "compare", str(DIGITS), "--n-examples",
                           str(DEMO_EXAMPLES)], cwd=tmp, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert (tmp / "mlflow.db").is_file()  # the working directory's store, which `make ui` serves
    cfg = load_config(DIGITS)
    c = tracking.client(uri)
    (parent,) = c.search_runs([c.get_experiment_by_name(cfg.experiment).experiment_id],
                              filter_string="tags.`sprout_kind` = 'compare'")
    return Demo(cfg, {"parent_run_id": parent.info.run_id}, tmp, uri, proc)


@pytest.mark.ray
@pytest.mark.slow
def test_make_demo_prints_a_line_per_epoch_and_attack_then_the_table_and_the_link(comparison) -> None:
    """Issue 15: at most ~60 lines (62), one per epoch of each method and one per attack finished on
    each model, then the table, the ranking, the masking line and the parent run's link. The
    full demo's wall time: ``benchmarks/demo_time.py --max-lines 62`` (the same check)."""
    proc = comparison.proc
    problems = check_output(proc.stdout, proc.stderr, DEMO_MAX_LINES, epochs=8, methods=METHODS)
    assert not problems, "\n".join([*problems, "--- output ---", proc.stdout, proc.stderr])
    evals = sorted(line.split(" done")[0] for line in proc.stderr.splitlines() if line.startswith("eval "))
    attacks = ["autoattack", "cw_linf", "invariance", "pgd20", "transfer"]
    assert evals == sorted(f"eval {m}: {a}" for m in METHODS for a in attacks), proc.stderr
    last = proc.stdout.rstrip().splitlines()[-1]
    assert f"/experiments/1/runs/{comparison.out['parent_run_id']}  (" in last, last  # the demo's own parent run


@pytest.mark.ray
@pytest.mark.slow
def test_comparison_report_has_every_column_and_measured_ratios(comparison) -> None:
    cfg, out, tmp, uri, _ = comparison
    c = tracking.client(uri)
    parent = c.get_run(out["parent_run_id"])
    assert parent.data.tags["sprout_kind"] == "compare" and parent.info.status == "FINISHED"
    path = c.download_artifacts(out["parent_run_id"], "report/comparison.csv", str(tmp))
    rows = {r["method"]: r for r in csv.DictReader(open(path))}
    assert sorted(rows) == sorted(METHODS)
    needed = ["test/clean_acc", "test/pgd20_acc", "test/transfer_acc", "test/rotation_acc", "test/brightness_acc",
              "test/contrast_acc", "test/gray_acc", "masking_flagged", "time/epoch_s", "images_per_s",
              "time/train_total_s", "time/accelerator_hours", "epoch_time_vs_natural", "epoch_time_vs_sprout"]
    for m, r in rows.items():
        for k in needed:
            assert r.get(k) not in (None, "", "nan"), f"{m}: {k} is empty"
        for k in needed[:7]:
            assert 0.0 <= float(r[k]) <= 1.0
    nat, spr = float(rows["natural"]["time/epoch_s"]), float(rows["sprout"]["time/epoch_s"])
    for r in rows.values():
        assert math.isclose(float(r["epoch_time_vs_natural"]), float(r["time/epoch_s"]) / nat, rel_tol=1e-9)
        assert math.isclose(float(r["epoch_time_vs_sprout"]), float(r["time/epoch_s"]) / spr, rel_tol=1e-9)
    # the ratio columns come from the per-epoch times each child run logged
    child = rows["pgd_at"]["run_id"]
    hist = sorted(m.value for m in c.get_metric_history(child, "time/epoch_s"))
    assert min(hist) <= float(rows["pgd_at"]["time/epoch_s"]) <= max(hist)
    # Each row holds its own method's numbers: recomputed here from that method's selected
    # checkpoint (its child run's config), they match exactly; swapped or shared rows would not.
    from tests.orchestrator.test_train import recompute, run_config

    by_method = {m: c.get_run(r["run_id"]) for m, r in rows.items()}
    seen = {}
    for m, r in rows.items():
        run = by_method[m]
        assert run.data.tags["method"] == m
        want = recompute(run_config(run.info.run_id, uri), run.data.tags["sprout.selected_checkpoint"],
                         ["pgd20", "invariance"], DEMO_EXAMPLES)
        for k in ("test/clean_acc", "test/pgd20_acc", "test/rotation_acc", "test/gray_acc"):
            assert float(r[k]) == want[k], (m, k, r[k], want[k])
        seen[m] = tuple(float(r[k]) for k in needed[:7])
    # Every row from its own checkpoint (two methods may tie on 40 examples, all four may not).
    assert len({run.data.tags["sprout.selected_checkpoint"] for run in by_method.values()}) == len(rows)
    assert len(set(seen.values())) > 1, f"every row holds the same numbers: {seen}"
    assert len({r.data.tags["sprout.selected_checkpoint"] for r in by_method.values()}) == len(METHODS)
    md = Path(c.download_artifacts(out["parent_run_id"], "report/comparison.md", str(tmp))).read_text()
    assert "| sprout |" in md and "test/pgd20_acc" in md
    plots = {a.path for a in c.list_artifacts(out["parent_run_id"], "plots")}
    assert {"plots/radar.png", "plots/robustness_vs_cost.png", "plots/input_gradient_cosine.png",
            "plots/loss_landscape.png"} <= plots


@pytest.mark.ray
@pytest.mark.slow
def test_children_and_sprout_starts_from_natural(comparison) -> None:
    cfg, out, _, uri, _ = comparison
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(cfg.experiment)
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    by = {r.data.tags["method"]: r for r in kids}
    assert sorted(by) == sorted(METHODS) and len(kids) == len(METHODS)
    natural_ckpt = by["natural"].data.tags["sprout.selected_checkpoint"]
    assert by["sprout"].data.params["train.init_from"] == natural_ckpt
    assert by["pgd_at"].data.params["train.init_from"] == by["trades"].data.params["train.init_from"] == "None"
    for r in kids:
        assert "test/clean_acc" in r.data.metrics and r.data.tags.get("masking.flagged") in ("true", "false")
    assert "plots/beta_correlation.png" in {a.path for a in c.list_artifacts(by["sprout"].info.run_id, "plots")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(url: str, *args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    prof = Path(os.environ.get("TMPDIR", "/tmp")) / f"chrome-{os.getpid()}-{time.monotonic_ns()}"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={prof}", "--virtual-time-budget=10000", "--window-size=1400,900", *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(prof, ignore_errors=True)
    return out.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="needs chromium")
def test_mlflow_ui_shows_the_comparison_in_a_real_browser(comparison, session_dir) -> None:
    cfg, out, tmp, uri, _ = comparison
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **MLFLOW_SERVER_ENV},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if not (time.time() < deadline and server.poll() is None):
                pytest.fail("mlflow server did not come up")
            time.sleep(1)
        c = tracking.client(uri)
        exp_id = c.get_experiment_by_name(cfg.experiment).experiment_id
        runs_dom = _chromium(f"{base}/#/experiments/{exp_id}/runs", "--dump-dom")
        parent = c.get_run(out["parent_run_id"]).info.run_name
        assert parent in runs_dom  # the comparison's parent run is listed
        kids = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in kids]))
        url = f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
        dom = _chromium(url, "--dump-dom")
        for kid in kids:
            assert kid.info.run_name in dom, f"run {kid.info.run_name} not on the compare page"
        assert len(kids) == len(METHODS)
        # accuracy and robustness: the metrics table's first rows (MLflow renders the rest on scroll)
        assert "test/clean_acc" in dom and "test/autoattack_acc" in dom
        # cost: the time/epoch_s page of the same runs lists each run's last epoch time, as logged
        q = lambda v: urllib.parse.quote(json.dumps(v))  # noqa: E731
        murl = (f"{base}/#/metric?runs={ids}&metric={q('time/epoch_s')}&experiments={q([exp_id])}"
                f"&plot_metric_keys={q(['time/epoch_s'])}&plot_layout={{}}&x_axis=step&y_axis_scale=linear"
                "&line_smoothness=1&show_point=false&deselected_curves=[]&last_linear_y_axis_range=[]")
        mdom = _chromium(murl, "--dump-dom")
        for kid in kids:
            last = max(c.get_metric_history(kid.info.run_id, "time/epoch_s"), key=lambda m: m.step)
            assert kid.info.run_name in mdom and f"{last.value!r} (step={last.step})" in mdom, kid.info.run_name
        shot = session_dir / "mlflow_compare.png"
        _chromium(url, f"--screenshot={shot}")
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
        c.log_artifact(out["parent_run_id"], str(shot), "ui")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.slow
def test_sprout_init_scratch_trains_sprout_without_natural(tmp_path, ray_local) -> None:
    """``--sprout-init scratch``: no natural phase is added and SPROUT starts from random weights."""
    from orchestrator.cli import main

    sets = [f"storage.path={tmp_path / 'rr'}", "eval.attacks=[]", "train.epochs=1", "train.val_pgd_steps=2",
            "experiment=test-compare-scratch"]
    code = main(["compare", str(DIGITS), "--methods", "sprout", "--sprout-init", "scratch", "--attacks", "pgd20",
                 "--n-examples", "32", "--name", "cmp-scratch", *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    c = tracking.client()
    exp = c.get_experiment_by_name("test-compare-scratch")
    parent = c.search_runs([exp.experiment_id], filter_string="tags.`sprout.run_key` = 'cmp-scratch'")[0]
    assert parent.info.status == "FINISHED" and parent.data.params["compare.sprout_init"] == "scratch"
    assert parent.data.params["compare.methods"] == "sprout"
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [(k.data.tags["method"], k.info.status) for k in kids] == [("sprout", "FINISHED")]
    assert kids[0].data.params["train.init_from"] == "None"
    assert "test/pgd20_acc" in kids[0].data.metrics
