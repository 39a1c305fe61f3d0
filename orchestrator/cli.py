"""The ``sprout`` command (SPEC §4). Exit codes: 0 success, 2 usage/config error, 1 run failure.

Config and usage errors print one line naming the field and the allowed values, before
any Ray or MLflow resource is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from orchestrator import tracking
from orchestrator.config import ATTACK_NAMES, ConfigError, load_config
from orchestrator.console import console


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"sprout: usage error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key; the value is parsed as YAML (repeatable)")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="stream Ray's and the workers' output here instead of to the log file")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sprout", description="SPROUT and robust-training baselines on Ray Train/Tune with MLflow")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", help="resolve and validate a config; print it and the resource plan")
    _add_config(p)
    p.add_argument("--connect", action="store_true", help="check the plan against the Ray cluster at RAY_ADDRESS")

    p = sub.add_parser("train", help="one Ray Train run; re-running the same --name resumes it")
    _add_config(p)
    p.add_argument("--name", help="run name (Ray run directory and MLflow run); default: method-model-data-time")
    _add_verbose(p)

    p = sub.add_parser("eval", help="the evaluation suite on a trained model, logged to its MLflow run")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint directory (needs --config)")
    p.add_argument("--run-id", help="an MLflow training run (uses its config and selected checkpoint)")
    p.add_argument("--config", help="config of a bare checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--attacks", help="comma-separated: " + ",".join(ATTACK_NAMES))
    p.add_argument("--n-examples", type=int, help="evaluate on the first N test examples (seeded subset)")
    p.add_argument("--shards", type=int, help="Ray tasks to shard the examples over (default eval.num_shards)")
    _add_verbose(p)

    p = sub.add_parser("sweep", help="a Ray Tune sweep; each trial a Ray Train run; re-running resumes")
    _add_config(p)
    p.add_argument("--space", required=True, help="search space name (search_spaces/)")
    p.add_argument("--samples", type=int, help="trials to sample (default tune.num_samples)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], help="default tune.scheduler")
    p.add_argument("--search", choices=["random", "optuna"], help="default tune.search")
    p.add_argument("--name", help="sweep name (Tune experiment and MLflow parent run)")
    _add_verbose(p)

    p = sub.add_parser("compare", help="train and evaluate several methods side by side; write the report")
    _add_config(p)
    p.add_argument("--methods", help="comma-separated (default natural,pgd_at,trades,sprout; ablations: sprout_ga, ...)")
    p.add_argument("--sprout-init", default="natural", choices=["natural", "scratch"],
                   help="SPROUT starts from the natural model's checkpoint (paper default) or from scratch")
    p.add_argument("--name", help="comparison name (MLflow parent run)")
    p.add_argument("--attacks", help="override eval.attacks (comma-separated)")
    p.add_argument("--n-examples", type=int, help="test examples per evaluation")
    _add_verbose(p)

    p = sub.add_parser("prepare-data", help="convert an ImageNet folder into Parquet shards for Ray Data")
    p.add_argument("dataset", help="only 'imagenet'")
    p.add_argument("src", help="ImageNet-layout folder (train/ and val/ with class sub-folders)")
    p.add_argument("dst", help="output folder or pyarrow filesystem URI (s3://, gs://)")
    p.add_argument("--shard-size", type=float, default=256.0, help="target shard size in MB")
    p.add_argument("--workers", type=int, default=1, help="parallel readers")
    p.add_argument("--on-corrupt", choices=["skip", "fail"], default="skip", help="unreadable images: skip or fail")

    p = sub.add_parser("replay-metrics", help="deliver metrics buffered while MLflow was unreachable")
    p.add_argument("path", help="an mlflow_pending.jsonl file under the storage path")
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.session import check_plan, cluster_capacity, plan_for

    cfg = load_config(args.config, args.overrides)
    plan = plan_for(cfg)
    capacity = cluster_capacity(connect=args.connect)
    check_plan(plan, capacity)
    print(cfg.to_yaml(), end="")
    print(f"# resource plan: {plan.describe()}")
    if capacity.autoscaler:
        limit = "unknown" if capacity.maximum is None else _res(capacity.maximum)
        print(f"# autoscaling cluster: up now {_res(capacity.now)}; maximum {limit} ({capacity.source})")
    print(f"# storage: {cfg.storage.path}   mlflow: {os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///mlflow.db'}")
    return 0


def _preflight(cfg: Any) -> None:
    """Before Ray or MLflow is touched: the MLflow server answers and accepts the credentials, and
    ``storage.path`` takes a marker written and read back (issue 12). Failures exit 2, one line."""
    from orchestrator import storage, tracking

    tracking.check_reachable()
    try:
        storage.preflight(cfg.storage.path)
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.runner import default_name, run_training, safe_name
    from orchestrator.session import check_plan, cluster_capacity, plan_for

    cfg = load_config(args.config, args.overrides)
    from orchestrator.config import checkpoint_metric, require_transfer_source

    name = safe_name(args.name) if args.name else default_name(cfg)
    require_transfer_source(cfg)  # transfer needs eval.transfer_source outside compare (exit 2, before Ray)
    capacity = cluster_capacity()
    check_plan(plan_for(cfg), capacity)
    _preflight(cfg)
    _start_log(args, cfg, name)
    out = run_training(cfg, name, wait_for_nodes=capacity.autoscaler)
    metric = checkpoint_metric(cfg)
    best = out.metrics.get(metric)
    console.out(f"run {out.name} finished{' (resumed)' if out.resumed else ''}: selected by {metric} on the "
                f"validation split" + (f" = {best:.4f}" if best is not None else "") + f"; checkpoint {out.best_checkpoint_path}")
    if cfg.eval.attacks and out.best_checkpoint_path:
        from orchestrator.evaluate import evaluate_states, log_evaluation
        from orchestrator.storage import load_checkpoint

        state = load_checkpoint(out.best_checkpoint_path)
        result = evaluate_states(cfg, state["model"], attacks=list(cfg.eval.attacks), label=name)
        log_evaluation(out.run_id, result, cfg=cfg, state=state)
        console.out(result.summary())
    console.out(f"MLflow run: {tracking.run_url(out.run_id)}")
    return 0


def _start_log(args: argparse.Namespace, cfg: Any, name: str) -> None:
    """Unless --verbose (or called in-process, as tests do): Ray's and the workers' output to a
    log file beside the run's checkpoints (local storage; else ~/.cache/sprout/logs)."""
    import time
    from pathlib import Path

    if getattr(args, "verbose", False) or not getattr(args, "capture", False):
        return
    local = cfg is not None and "://" not in cfg.storage.path
    root = Path(cfg.storage.path) if local else Path.home() / ".cache" / "sprout" / "logs"
    console.capture(root / name / "logs" / f"sprout-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}.log")


def _res(res: dict[str, float]) -> str:
    return ", ".join(f"{res.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))


def _attacks(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ATTACK_NAMES]
    if bad:
        raise ConfigError(f"--attacks: unknown attack {bad[0]!r}; expected some of: {', '.join(ATTACK_NAMES)}")
    return names


def cmd_eval(args: argparse.Namespace) -> int:
    from orchestrator.evaluate import evaluate_checkpoint, evaluate_run

    attacks = _attacks(args.attacks)
    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {args.n_examples}")
    if bool(args.run_id) == bool(args.checkpoint):
        raise ConfigError("eval: give exactly one of CHECKPOINT (with --config) or --run-id")
    if args.run_id:
        _start_log(args, None, f"eval-{args.run_id}")
        evaluate_run(args.run_id, attacks=attacks, n_examples=args.n_examples, num_shards=args.shards)
        console.out(f"MLflow run: {tracking.run_url(args.run_id)}")
        return 0
    if not args.config:
        raise ConfigError("eval CHECKPOINT needs --config (the config the checkpoint was trained with)")
    cfg = load_config(args.config, args.overrides)
    _start_log(args, cfg, f"eval-{os.path.basename(os.path.normpath(args.checkpoint))}")
    run_id, _ = evaluate_checkpoint(args.checkpoint, cfg, attacks=attacks, n_examples=args.n_examples,
                                    num_shards=args.shards)
    console.out(f"MLflow run: {tracking.run_url(run_id)}")
    return 0


def _check_tune_plan(cfg: Any) -> None:
    """A sweep's or comparison's trial must fit the cluster's maximum (exit 2 otherwise)."""
    from orchestrator.session import check_plan, cluster_capacity, plan_for

    check_plan(plan_for(cfg, tune=True), cluster_capacity())


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.runner import safe_name
    from orchestrator.sweep import run_sweep
    from search_spaces import SearchSpaceError, load_space

    cfg = load_config(args.config, args.overrides)
    try:
        load_space(args.space)
    except SearchSpaceError as e:
        raise ConfigError(str(e)) from None
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    name = safe_name(args.name or f"sweep-{args.space}-{cfg.data.name}")
    _check_tune_plan(cfg)  # before the preflight writes its marker under storage.path
    _preflight(cfg)
    _start_log(args, cfg, name)
    out = run_sweep(cfg, args.space, name=name, samples=args.samples, scheduler=args.scheduler, search=args.search)
    console.out(f"sweep {name}: {len(out['rows'])} trial(s)")
    if out.get("best"):
        console.out("best: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in out["best"].items()))
    console.out(f"MLflow parent run: {tracking.run_url(out['parent_run_id'])}")
    failed = [r for r in out["rows"] if r.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(out['rows'])} trial(s) failed (first: trial "
                           f"{failed[0]['trial_id']}, {failed[0]['error']}); the parent run is FAILED")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from orchestrator.compare import console_table, parse_methods, run_compare
    from orchestrator.runner import safe_name

    cfg = load_config(args.config, args.overrides)
    methods = parse_methods(args.methods)
    attacks = _attacks(args.attacks)
    name = safe_name(args.name or f"compare-{cfg.data.name}-{cfg.model.name}")
    _check_tune_plan(cfg)
    _preflight(cfg)
    _start_log(args, cfg, name)
    out = run_compare(cfg, methods, name=name, sprout_init=args.sprout_init, attacks=attacks,
                      n_examples=args.n_examples)
    console.out()
    console.out(console_table(out["rows"], cfg))
    console.out(f"MLflow parent run: {tracking.run_url(out['parent_run_id'])}  "
                "(report/comparison.md and .csv are its artifacts; `make ui` serves it)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from orchestrator.prepare_data import prepare_data_cli

    return prepare_data_cli(args.dataset, args.src, args.dst, args.shard_size, args.workers, args.on_corrupt)


def cmd_replay(args: argparse.Namespace) -> int:
    from orchestrator.tracking import replay_pending

    n = replay_pending(args.path)
    print(f"delivered {n} metric values from {args.path}")
    return 0


COMMANDS: dict[str, Any] = {
    "validate": cmd_validate, "train": cmd_train, "eval": cmd_eval, "sweep": cmd_sweep, "compare": cmd_compare,
    "prepare-data": cmd_prepare, "replay-metrics": cmd_replay,
}


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a real command line (not a call from Python, e.g. a test) sends Ray's output to a log file
    args.capture = argv is None
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # SIGTERM (preemption, `kill`, Kubernetes) stops like Ctrl-C: the MLflow run is
        # marked KILLED, checkpoints up to the last finished epoch are kept, a re-run resumes.
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        console.say(f"sprout: config error: {e}")
        return 2
    except KeyboardInterrupt:
        console.say("sprout: interrupted; the last epoch's checkpoint is kept: re-run the same command to resume")
        return 130
    except Exception as e:  # noqa: BLE001 - a failed run: one clear line, exit 1
        if os.environ.get("SPROUT_TRACEBACK"):
            raise
        tail = console.tail()
        if tail:
            console.say(f"the workers' last lines in the log {console.log_path}:")
            for line in tail:
                console.say(f"  | {line[:400]}")
        console.say(f"sprout: {args.command} failed: {type(e).__name__}: {e}")
        return 1


def run() -> NoReturn:
    """The ``sprout`` command (its console script and ``python -m orchestrator``): :func:`main`,
    then :func:`exit_now` with its exit code. Calls from Python (tests) use :func:`main`."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End this process with ``code``, skipping CPython's teardown of its modules.

    First what a normal exit does before that teardown: join the non-daemon threads, run the
    atexit handlers (Ray's shutdown of a local instance, MLflow's and logging's flushes) and
    flush the output. The teardown itself runs C-level destructors only once torch, Ray and
    MLflow are loaded: ~3.5 s of every `sprout` command on a 2-core machine (BENCHMARKS.md, CI
    wall time, stop 29), for nothing a later process reads.
    """
    import atexit
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # what Py_FinalizeEx runs before the teardown; handlers' errors are printed, not raised
    for stream in (console.stdout, console.err, sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (ValueError, OSError):  # closed, or its reader went away
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
