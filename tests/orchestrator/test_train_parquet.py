"""``sprout train`` on ImageNet Parquet shards streamed by Ray Data, 2 CPU workers (issue 6)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator import tracking
from orchestrator.prepare_data import prepare_imagenet
from orchestrator.ray_data import in_val_split, row_id
from orchestrator.runner import run_training
from tests.conftest import digits_cfg
from tests.orchestrator.imagenet_fixture import make_imagenet

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_workers_stream_disjoint_equal_shares_of_the_shards(tmp_path, ray_local, session_dir) -> None:
    make_imagenet(tmp_path / "src")
    shards = tmp_path / "shards"
    prepare_imagenet(tmp_path / "src", str(shards), shard_size_mb=0.012, progress=False)
    cfg = digits_cfg(
        tmp_path, "experiment=test-parquet", "data.name=imagenet", "data.format=parquet", f"data.root={shards}",
        "data.image_size=32", "data.batch_size=2", "data.eval_batch_size=2", "data.val_fraction=0.25",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "train.epochs=2", "train.val_pgd_steps=0",
    )
    out = run_training(cfg, "parquet-two-workers")
    c = tracking.client()
    assert sorted(m.step for m in c.get_metric_history(out.run_id, "train/loss")) == [1, 2]
    assert sorted(m.step for m in c.get_metric_history(out.run_id, "val/clean_acc")) == [1, 2]

    paths = [p for f in sorted((shards / "train").glob("*.parquet"))
             for p in pq.read_table(f, columns=["path"])["path"].to_pylist()]
    val = in_val_split(paths, cfg.train.seed, cfg.data.val_fraction)
    train_ids = {row_id(p) for p, v in zip(paths, val) if not v}
    debug = Path(os.environ["SPROUT_DEBUG_DIR"]) / "parquet-two-workers"
    for epoch in range(2):
        seen = [json.loads((debug / f"worker-{r}-epoch-{epoch}.json").read_text())["ids"] for r in (0, 1)]
        assert seen[0] and len(seen[0]) == len(seen[1]), "unequal shares"
        assert set(seen[0]).isdisjoint(seen[1]), "workers saw the same rows"
        assert set(seen[0]) | set(seen[1]) <= train_ids, "a validation or unknown row was trained on"
