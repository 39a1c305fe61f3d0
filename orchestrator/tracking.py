"""MLflow tracking with the SPEC §5 names: one run per training run, no duplicates on restart.

Runs are found again by the tag ``sprout.run_key`` (the ``--name``, or a trial/method key
under a parent run), so a re-run resumes into the same MLflow run. Per-epoch metrics are
logged idempotently (an epoch already logged is not logged twice after a replay) and are
buffered when the tracking server is unreachable, then delivered when it returns; what
cannot be delivered by the end is written to a JSON-lines file that ``replay_pending``
sends later.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

RUN_KEY = "sprout.run_key"
ERROR_TAG = "sprout.error"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db`` (SPEC §4)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


# Set at submit time on clusters, where the uploaded working directory has no .git
# (docs/cluster.md: `ray job submit --runtime-env-json`, the image's GIT_SHA build arg).
GIT_SHA_ENV = "SPROUT_GIT_SHA"


def git_sha() -> str:
    """The commit of the code that runs: ``SPROUT_GIT_SHA``, else ``git rev-parse HEAD``."""
    given = os.environ.get(GIT_SHA_ENV, "").strip()
    if given and given != "unknown":  # "unknown": an image built without its GIT_SHA build arg
        return given
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_url(run_id: str, uri: str | None = None) -> str:
    """Where a user opens the run: the tracking server's UI, or `make ui`'s for a local store."""
    uri = uri or tracking_uri()
    c = client(uri)
    exp = c.get_run(run_id).info.experiment_id
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp}/runs/{run_id}"


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (not in whatever cwd a worker has)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment)
        return (db.parent / "mlartifacts" / safe).as_uri()
    return None


def experiment_id(c: Any, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(c.tracking_uri, name))
    except Exception:  # noqa: BLE001 - another process created it first (concurrent trials)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(c: Any, exp_id: str, key: str, parent_run_id: str | None = None) -> Any | None:
    flt = f"tags.`{RUN_KEY}` = '{key}'"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = c.search_runs([exp_id], filter_string=flt, max_results=5, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def get_or_create_run(
    c: Any, experiment: str, key: str, *, run_name: str, tags: dict[str, str], parent_run_id: str | None = None
) -> tuple[str, bool]:
    """(run_id, resumed): the run tagged ``key`` (under ``parent_run_id``), else a new one."""
    exp_id = experiment_id(c, experiment)
    existing = find_run(c, exp_id, key, parent_run_id)
    if existing is not None:
        c.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, True
    all_tags = {RUN_KEY: key, "mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name)
    return run.info.run_id, False


def log_params_once(c: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run (MLflow params are immutable; a resume re-logs none)."""
    from mlflow.entities import Param

    have = c.get_run(run_id).data.params
    todo = [Param(k, _param_str(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), 100):
        c.log_batch(run_id, params=todo[i : i + 100])


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v)
    return s[:6000]


class MetricLogger:
    """Per-step metric logging that survives replays, tracking-server outages and lost workers.

    While the server is unreachable, what is pending is also kept in the fallback file (written
    whole, atomically, after each failed delivery), so a worker killed during an outage loses
    nothing: the logger of the restarted worker takes the file over, and its next delivery
    sends those rows too (steps the server already has are dropped) and removes the file.
    """

    def __init__(self, uri: str, run_id: str, fallback: str | os.PathLike[str] | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.fallback = str(fallback) if fallback else None  # a path or a storage URI (s3://...)
        self.pending: list[tuple[str, float, int, int]] = []
        self.logged_steps: dict[str, set[int]] = {}
        self._client = client(uri)
        self._on_file = False  # the fallback file holds this run's pending rows (and _others)
        self._others = ""  # other runs' lines found in the fallback file: written back untouched
        self._recheck = False  # pending holds taken-over rows: drop steps the server already has
        self._owns_file = self._take_over()

    def _take_over(self) -> bool:
        """Read the fallback file a killed worker of this run left; False when it could not be read
        (storage unreachable, or not our format): it is then left alone, for ``replay-metrics``."""
        if self.fallback is None:
            return False
        from orchestrator import storage

        try:
            lines = [ln for ln in storage.read_bytes(self.fallback).decode().splitlines() if ln.strip()]
            rows = [(ln, json.loads(ln)) for ln in lines]
            mine = [(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                    for _, r in rows if r["run_id"] == self.run_id]
        except FileNotFoundError:
            return True
        except Exception:  # noqa: BLE001 - unreadable now: never crash training over it
            return False
        self._others = "".join(ln + "\n" for ln, r in rows if r["run_id"] != self.run_id)
        self.pending.extend(mine)
        self._on_file, self._recheck = True, bool(mine)
        return True

    def _known_steps(self, key: str) -> set[int]:
        if key not in self.logged_steps:
            try:
                hist = self._client.get_metric_history(self.run_id, key)
                self.logged_steps[key] = {m.step for m in hist}
            except Exception:  # noqa: BLE001 - server down: assume nothing logged, dedupe later
                return set()
        return self.logged_steps[key]

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if step not in self._known_steps(k):
                self.pending.append((k, float(v), ts, step))
        if not self.flush():
            self._spill()

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left."""
        if not self.pending:
            return True
        from mlflow.entities import Metric

        try:
            if self._recheck:  # a killed worker may have delivered some of them before its file went
                for key in {k for k, *_ in self.pending}:
                    self.logged_steps[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)}
                self.pending = [p for p in self.pending if p[3] not in self.logged_steps[p[0]]]
                self._recheck = False
            batch = [Metric(k, v, ts, s) for k, v, ts, s in self.pending]
            for i in range(0, len(batch), 500):
                self._client.log_batch(self.run_id, metrics=batch[i : i + 500])
        except Exception:  # noqa: BLE001 - any transport error: keep buffering, never crash training
            return False
        for k, _, _, s in self.pending:
            self.logged_steps.setdefault(k, set()).add(s)
        self.pending.clear()
        if self._on_file:
            try:
                self._write_file()  # what it held is delivered now
            except Exception:  # noqa: BLE001 - left for the next delivery (taken-over rows are re-checked)
                pass
        return True

    def _lines(self) -> str:
        return "".join(json.dumps({"run_id": self.run_id, "key": k, "value": v, "timestamp": ts, "step": s}) + "\n"
                       for k, v, ts, s in self.pending)

    def _write_file(self) -> None:
        """The fallback file := other runs' lines + what is pending (removed when both are empty)."""
        from orchestrator import storage

        text = self._others + self._lines()
        if text:
            storage.write_bytes(self.fallback, text.encode())
        else:
            storage.delete(self.fallback)
        self._on_file = bool(self.pending)

    def _spill(self) -> None:
        if self.fallback is None:
            return
        self._owns_file = self._owns_file or self._take_over()
        if self._owns_file:
            try:
                self._write_file()
            except Exception:  # noqa: BLE001 - storage down too: the rows stay in memory
                pass

    @staticmethod
    def record_error(uri: str, run_id: str, message: str) -> None:
        client(uri).set_tag(run_id, ERROR_TAG, message[:5000])

    def close(self, retries: int = 3, wait_s: float = 2.0) -> None:
        for _ in range(retries):
            if self.flush():
                return
            time.sleep(wait_s)
        if self.pending and self.fallback is not None:
            from orchestrator import storage

            if self._owns_file:
                self._write_file()
            else:  # the file could not be read: add to it, never replace what it holds
                storage.append_text(self.fallback, self._lines())
            self.pending.clear()


def replay_pending(path: str | os.PathLike[str], uri: str | None = None) -> int:
    """Deliver metrics written to a fallback file; returns how many were sent."""
    from mlflow.entities import Metric

    from orchestrator import storage

    rows = [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]
    c = client(uri)
    by_run: dict[str, list[Metric]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(Metric(r["key"], r["value"], r["timestamp"], r["step"]))
    for run_id, ms in by_run.items():
        for i in range(0, len(ms), 500):
            c.log_batch(run_id, metrics=ms[i : i + 500])
    storage.delete(path)
    return len(rows)


def check_reachable(uri: str | None = None, timeout_s: float = 10.0) -> None:
    """Fail fast, before training, when the tracking server cannot be reached."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:  # noqa: S310 - user URI
            if r.status != 200:
                raise RuntimeError(f"status {r.status}")
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise ConnectionError(f"MLflow tracking server {uri} is not reachable ({e}); start it or fix MLFLOW_TRACKING_URI") from None
    check_credentials(uri, timeout_s)


def check_credentials(uri: str, timeout_s: float = 10.0) -> None:
    """An authenticated request with the standard ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` (or
    ``MLFLOW_TRACKING_TOKEN``): a server that refuses them is a configuration error (exit 2), found
    before any run starts. The credentials are sent only in the header, never printed or logged."""
    import base64
    import urllib.error
    import urllib.request

    from orchestrator.config import ConfigError

    headers = {}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user or password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    req = urllib.request.Request(  # noqa: S310 - the user's tracking URI
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):  # noqa: S310
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            if e.code == 403:
                why = f"user {user!r} has no permission" if user else "access denied"
            elif user or password:
                why = f"the credentials of user {user!r} were rejected"
            else:
                why = "authentication required and MLFLOW_TRACKING_USERNAME is unset"
            raise ConfigError(
                f"MLflow tracking server {uri} refused the request (HTTP {e.code}: {why}); "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        # other statuses (an old server without this endpoint, a proxy quirk): let the run find out
    except (urllib.error.URLError, OSError):
        pass
