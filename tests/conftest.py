"""Shared fixtures: one MLflow SQLite store and one local Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sprout-session")


@pytest.fixture(scope="session")
def mlflow_uri(session_dir: Path) -> str:
    uri = f"sqlite:///{session_dir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture
def ray_local(mlflow_uri: str, session_dir: Path):
    """A real local Ray instance (started once, reused; re-started if a test shut it down)."""
    import ray

    os.environ["SPROUT_DEBUG_DIR"] = str(session_dir / "debug")
    from orchestrator.session import ensure_ray

    if ray.is_initialized() and os.environ.get("MLFLOW_TRACKING_URI") != mlflow_uri:
        ray.shutdown()
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    ensure_ray()
    yield ray


def digits_cfg(tmp: Path, *overrides: str):
    from orchestrator.config import load_config

    base = [f"storage.path={tmp / 'ray_results'}", "eval.attacks=[]", "train.epochs=3",
            "train.checkpoint_keep=10", "train.val_pgd_steps=5"]
    return load_config(DIGITS, [*base, *overrides])
