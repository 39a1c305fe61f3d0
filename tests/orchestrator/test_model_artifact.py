"""The logged MLflow model runs no pickled code when loaded (issue 15, item 4).

``model/`` is MLflow's ``pt2`` (torch.export) archive; ``runner.load_logged_model`` has MLflow
check every record before ``torch.export.load`` sees it. An archive whose record is replaced
by a pickle whose ``__reduce__`` would write a marker file is refused in one line, and the
marker is never written; the untampered model reproduces the checkpoint's outputs.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from orchestrator import tracking
from orchestrator.runner import UnsafeModelError, load_logged_model, log_final_model
from tests.conftest import digits_cfg

MARKER_ENV = "SPROUT_TEST_PICKLE_MARKER"


class _Payload:
    """Unpickling this writes the file named by $SPROUT_TEST_PICKLE_MARKER: code ran."""

    def __reduce__(self):
        return (Path.write_text, (Path(os.environ[MARKER_ENV]), "pickled code ran"))


@pytest.fixture
def logged(tmp_path, mlflow_uri):
    from orchestrator.worker import build_model, data_info
    from trainables.checkpoint import save_checkpoint

    cfg = digits_cfg(tmp_path, "experiment=model-artifact")
    torch.manual_seed(3)
    model = build_model(cfg, data_info(cfg)).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict(), "epoch": 0})
    c = tracking.client()
    run = c.create_run(tracking.experiment_id(c, cfg.experiment))
    log_final_model(cfg, run.info.run_id, str(ckpt))
    return run.info.run_id, model


def _archive(run_id: str) -> Path:
    local = Path(tracking.client().download_artifacts(run_id, "model"))
    (pt2,) = local.rglob("*.pt2")
    return pt2


def test_logged_model_is_pt2_and_reproduces_the_checkpoint(logged) -> None:
    run_id, model = logged
    pt2 = _archive(run_id)
    with zipfile.ZipFile(pt2) as z:
        assert any(n.endswith("models/model.json") for n in z.namelist())  # a traced graph, no model code
    loaded = load_logged_model(f"runs:/{run_id}/model")
    x = torch.rand(5, 1, 8, 8)  # a batch size other than the example's: the batch stays dynamic
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), model(x).argmax(1))
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


@pytest.mark.parametrize("record", ["data/sample_inputs/model.pt", "data/weights/weight_10"])
def test_a_pickle_in_the_archive_is_refused_and_never_runs(logged, tmp_path, monkeypatch, record) -> None:
    run_id, _ = logged
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    # Tamper with the artifact store itself: the archive MLflow will download and load.
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    model_id = mlflow.models.get_model_info(f"runs:/{run_id}/model").model_id
    c = tracking.client()
    root = Path(c.get_experiment(c.get_run(run_id).info.experiment_id).artifact_location.removeprefix("file://"))
    (pt2,) = [p for p in root.rglob("*.pt2") if model_id in str(p)]
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(pt2) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(record):
                data = pickle.dumps(_Payload())
            dst.writestr(item, data)
    shutil.copyfile(tampered, pt2)
    with pytest.raises(UnsafeModelError) as e:
        load_logged_model(f"runs:/{run_id}/model")
    assert "\n" not in str(e.value) and "refused to load" in str(e.value)
    if "sample_inputs" in record:  # MLflow's own check names the record it refused
        assert "sample_inputs" in str(e.value)
    assert not marker.exists(), "the pickled payload ran"
    if "weights" in record:  # torch reads weights as raw bytes: never unpickled, by either loader
        return
    # the tampered archive is a real threat: torch.export.load alone runs the payload
    with pytest.raises(RuntimeError):
        torch.export.load(str(pt2))
    assert marker.read_text() == "pickled code ran"
