"""The console's MLflow polling (``orchestrator/console.py``: ``Watcher.poll``) on a real SQLite
store: the epoch line it prints, and what one poll costs. On a production ``mlflow server``
every call is an HTTP request and a password check, so a poll with nothing new must stay at one
run lookup and one metric history per run (the other metrics only when an epoch is new)."""

from __future__ import annotations

import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from orchestrator.console import Watcher, children_finder


class Counting:
    """The real ``MlflowClient``, recording the name of every call made through it."""

    def __init__(self, client: MlflowClient) -> None:
        self._client, self.calls = client, []

    def __getattr__(self, name: str):
        fn = getattr(self._client, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return call


def _log_epoch(c: MlflowClient, run_id: str, step: int, loss: float, clean: float, pgd: float, secs: float) -> None:
    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric("train/loss", loss, ts, step), Metric("val/clean_acc", clean, ts, step),
                                 Metric("val/pgd_acc", pgd, ts, step), Metric("time/epoch_s", secs, ts, step)])


def test_a_quiet_poll_makes_two_calls_and_a_new_epoch_prints_its_whole_line(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("console-poll"), run_name="r").info.run_id
    w = Watcher(uri)
    w.add(run_id, "r", epochs=3)
    client = Counting(c)
    capsys.readouterr()  # MLflow's own lines from creating the store

    w.poll(client)  # running, no epoch yet
    assert client.calls == ["get_run", "get_metric_history"]
    assert capsys.readouterr().err == ""

    _log_epoch(c, run_id, 1, loss=1.5, clean=0.8, pgd=0.4, secs=2.0)
    client.calls.clear()
    w.poll(client)
    assert client.calls == ["get_run"] + ["get_metric_history"] * 4
    assert capsys.readouterr().err == "r: epoch 1/3  loss 1.5000  val clean 0.800  pgd 0.400  2.0 s/epoch  ETA 0m04s\n"

    client.calls.clear()
    w.poll(client)  # nothing new: not printed again
    assert client.calls == ["get_run", "get_metric_history"]
    assert capsys.readouterr().err == ""

    _log_epoch(c, run_id, 2, loss=1.25, clean=0.85, pgd=0.45, secs=4.0)
    _log_epoch(c, run_id, 3, loss=1.0, clean=0.9, pgd=0.5, secs=3.0)
    c.set_terminated(run_id)
    client.calls.clear()
    w.poll(client)  # two epochs between polls: both lines, each with its own values
    assert client.calls == ["get_run"] + ["get_metric_history"] * 4
    assert capsys.readouterr().err == (
        "r: epoch 2/3  loss 1.2500  val clean 0.850  pgd 0.450  4.0 s/epoch  ETA 0m03s\n"
        "r: epoch 3/3  loss 1.0000  val clean 0.900  pgd 0.500  3.0 s/epoch\n")


def test_children_found_by_the_search_are_not_looked_up_again(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("console-sweep")
    parent = c.create_run(exp, run_name="sweep").info.run_id
    w = Watcher(uri, unfinished="stopped early")  # before the trials start, as in a sweep
    w.discover = children_finder("console-sweep", parent, lambda run: 2)
    time.sleep(0.01)
    kids = [c.create_run(exp, run_name=f"t{i}", tags={"mlflow.parentRunId": parent}).info.run_id for i in range(2)]
    client = Counting(c)
    capsys.readouterr()

    w.poll(client)
    assert sorted(r.label for r in w.runs.values()) == ["t0", "t1"]
    assert client.calls == ["get_experiment_by_name", "search_runs", "get_metric_history", "get_metric_history"]

    _log_epoch(c, kids[1], 1, loss=2.0, clean=0.5, pgd=0.25, secs=1.0)
    client.calls.clear()
    w.poll(client)
    assert client.calls == ["get_experiment_by_name", "search_runs", "get_metric_history"] + ["get_metric_history"] * 4
    assert capsys.readouterr().err == "t1: epoch 1/2  loss 2.0000  val clean 0.500  pgd 0.250  1.0 s/epoch  ETA 0m01s\n"
