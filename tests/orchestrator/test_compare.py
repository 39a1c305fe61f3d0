"""``sprout compare`` on digits, and its MLflow UI checked in a real browser (issue 5)."""

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

import pytest

from orchestrator import tracking
from orchestrator.compare import parse_methods, variant_overrides
from orchestrator.config import ConfigError
from tests.conftest import DIGITS, digits_cfg

METHODS = ["natural", "pgd_at", "sprout"]
ATTACKS = ["pgd20", "transfer", "invariance"]


def test_method_list_parsing_and_ablations() -> None:
    assert parse_methods(None) == ["natural", "pgd_at", "trades", "sprout"]
    assert variant_overrides("sprout_ga") == {"method": "sprout", "sprout.use_mixup": False,
                                              "sprout.use_dirichlet": False}
    with pytest.raises(ConfigError, match="unknown method 'madry'"):
        parse_methods("natural,madry")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, mlflow_uri, session_dir):
    from orchestrator.compare import run_compare
    from orchestrator.session import ensure_ray

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    ensure_ray()
    tmp = tmp_path_factory.mktemp("compare")
    cfg = digits_cfg(tmp, "train.epochs=2", "experiment=test-compare")
    out = run_compare(cfg, METHODS, name="cmp3", attacks=ATTACKS, n_examples=120)
    return cfg, out, tmp


@pytest.mark.ray
@pytest.mark.slow
def test_comparison_report_has_every_column_and_measured_ratios(comparison) -> None:
    cfg, out, tmp = comparison
    c = tracking.client()
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
        want = recompute(run_config(run.info.run_id), run.data.tags["sprout.selected_checkpoint"],
                         ["pgd20", "invariance"], 120)
        for k in ("test/clean_acc", "test/pgd20_acc", "test/rotation_acc", "test/gray_acc"):
            assert float(r[k]) == want[k], (m, k, r[k], want[k])
        seen[m] = tuple(float(r[k]) for k in ("test/clean_acc", "test/pgd20_acc", "test/rotation_acc"))
    assert len(set(seen.values())) == len(seen), f"two methods' rows are identical: {seen}"
    assert len({r.data.tags["sprout.selected_checkpoint"] for r in by_method.values()}) == len(METHODS)
    md = Path(c.download_artifacts(out["parent_run_id"], "report/comparison.md", str(tmp))).read_text()
    assert "| sprout |" in md and "test/pgd20_acc" in md
    plots = {a.path for a in c.list_artifacts(out["parent_run_id"], "plots")}
    assert {"plots/radar.png", "plots/robustness_vs_cost.png", "plots/input_gradient_cosine.png",
            "plots/loss_landscape.png"} <= plots


@pytest.mark.ray
@pytest.mark.slow
def test_children_and_sprout_starts_from_natural(comparison) -> None:
    cfg, out, _ = comparison
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.experiment)
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    by = {r.data.tags["method"]: r for r in kids}
    assert sorted(by) == sorted(METHODS) and len(kids) == 3
    natural_ckpt = by["natural"].data.tags["sprout.selected_checkpoint"]
    assert by["sprout"].data.params["train.init_from"] == natural_ckpt
    assert by["pgd_at"].data.params["train.init_from"] == "None"
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
def test_mlflow_ui_shows_the_comparison_in_a_real_browser(comparison, mlflow_uri, session_dir) -> None:
    cfg, out, tmp = comparison
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", mlflow_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
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
        c = tracking.client()
        exp_id = c.get_experiment_by_name(cfg.experiment).experiment_id
        runs_dom = _chromium(f"{base}/#/experiments/{exp_id}/runs", "--dump-dom")
        assert "cmp3" in runs_dom  # the comparison's parent run is listed
        kids = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in kids]))
        url = f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
        dom = _chromium(url, "--dump-dom")
        for m in METHODS:
            assert f"cmp3-{m}" in dom, f"run cmp3-{m} not on the compare page"
        assert "test/pgd20_acc" in dom and "time/epoch_s" in dom
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
