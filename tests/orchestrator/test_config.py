"""Config validation and the CLI's error contract: exit 2, one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from tests.conftest import DIGITS, ROOT

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))

# (overrides or file content, a fragment the one-line error must contain)
BAD_SETS = [
    (["bogus=1"], "bogus"),
    (["sprout.bogus=1"], "sprout.bogus"),
    (["train.epochs=-1"], "train.epochs"),
    (["train.epochs=two"], "train.epochs"),
    (["sprout.dirichlet_alpha=1.5"], "sprout.dirichlet_alpha"),
    (["sprout.dirichlet_alpha=-0.1"], "sprout.dirichlet_alpha"),
    (["sprout.mixup_alpha=0"], "sprout.mixup_alpha"),
    (["sprout.gaussian_delta=-1"], "sprout.gaussian_delta"),
    (["method=madry"], "method"),
    (["model.name=resnet9000"], "model.name"),
    (["data.name=mnist"], "data.name"),
    (["data.name=cifar10"], "data.root"),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["scaling.num_workers=0"], "scaling.num_workers"),
    (["scaling.cpus_per_worker=-1"], "scaling.cpus_per_worker"),
    (["eval.attacks=[pgd7]"], "eval.attacks"),
    (["eval.eps=2"], "eval.eps"),
    (["pgd_at.steps=0"], "pgd_at.steps"),
    (["pgd_at.bn_mode=frozen"], "pgd_at.bn_mode"),
    (["trades.beta=-1"], "trades.beta"),
    (["train.schedule=linear"], "train.schedule"),
    (["train.init_from=/nonexistent/ckpt"], "train.init_from"),
    (["tune.scheduler=hyperband"], "tune.scheduler"),
    (["train"], "--set"),
    # twice the host's cores (digits: 0.5 CPU per worker), whatever the host: never a real run
    ([f"scaling.num_workers={4 * (__import__('os').cpu_count() or 1)}", "eval.attacks=[pgd20]"],
     f"scaling: the plan needs {2 * (__import__('os').cpu_count() or 1)} CPU but the cluster has "
     f"{__import__('os').cpu_count() or 1} CPU; lower scaling.num_workers, scaling.cpus_per_worker or "
     "scaling.gpus_per_worker (or set scaling.use_gpu: false)"),
    # issue 13: every ε, step size and budget in pixel units, in every section (active or not)
    (["pgd_at.eps=2"], "pgd_at.eps"),
    (["pgd_at.eps=0"], "pgd_at.eps"),
    (["pgd_at.step_size=0.5"], "pgd_at.step_size"),
    (["pgd_at.step_size=0"], "pgd_at.step_size"),
    (["trades.eps=1.5"], "trades.eps"),
    (["trades.step_size=0.2"], "trades.step_size"),
    (["trades.steps=0"], "trades.steps"),
    (["free_at.eps=-0.1"], "free_at.eps"),
    (["free_at.replays=0"], "free_at.replays"),
    (["fgsm_rs.eps=3"], "fgsm_rs.eps"),
    (["fgsm_rs.step_size=0.5"], "fgsm_rs.step_size"),
    (["eval.eps=0"], "eval.eps"),
    (["eval.autoattack_eps=2"], "eval.autoattack_eps"),
    (["eval.eps_curve=[0.1,2]"], "eval.eps_curve"),
    (["eval.cw_l2_budgets=[0]"], "eval.cw_l2_budgets"),
    (["eval.restarts=0"], "eval.restarts"),
    (["data.augment=imagenet"], "data.augment"),
    (["data.augment=flip"], "data.augment"),
    (["data.split_seed=-1"], "data.split_seed"),
    (["train.checkpoint_metric=val/loss"], "train.checkpoint_metric"),
    (["sprout.uniform_smoothing=true"], "sprout.uniform_smoothing"),
    (["sprout.target_mix=mean"], "sprout.target_mix"),
    (["sprout.beta_update=never"], "sprout.beta_update"),
    (["sprout.theta_steps=0"], "sprout.theta_steps"),
    (["sprout.beta_momentum=1"], "sprout.beta_momentum"),
    # transfer without a source is an error outside compare, never a silent drop
    (["eval.attacks=[pgd20,transfer]"], "eval.transfer_source"),
]
BAD_FILES = [
    ("", "empty"),
    ("method: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "mapping"),
    ("method: sprout\nsprout:\n  dirichlet_alpha: 3\n", "sprout.dirichlet_alpha"),
    ("model: small_cnn\n", "model"),
]


def test_every_preset_validates() -> None:
    assert {p.stem for p in PRESETS} >= {"digits", "cifar10_vgg16", "cifar10_wrn", "imagenet_resnet50",
                                         "imagenet_resnet152", "sprout_reference_code"}
    for p in PRESETS:
        assert p.read_text().startswith("# sprout "), f"{p.name} must open with its launch command"
        data = yaml.safe_load(p.read_text())
        # Presets name cluster data paths; point them at an existing folder to validate the rest.
        overrides = [f"data.root={ROOT}"] if data.get("data", {}).get("root") else []
        cfg = load_config(p, overrides)
        assert cfg.experiment and cfg.method


def test_sprout_reference_code_preset_is_c_equals_10y_plus_beta() -> None:
    cfg = load_config(ROOT / "configs" / "sprout_reference_code.yaml", ["data.root=" + str(ROOT)])
    s = cfg.sprout
    # c = s·((1−α)y + αβ) = 10y + β  ⇔  s = 11, α = 1/11
    assert s.dirichlet_scale * (1 - s.dirichlet_alpha) == pytest.approx(10.0)
    assert s.dirichlet_scale * s.dirichlet_alpha == pytest.approx(1.0)


def test_set_overrides_parse_yaml_values() -> None:
    cfg = load_config(DIGITS, ["sprout.dirichlet_alpha=0.05", "eval.attacks=[pgd20,autoattack]", "train.bf16=true"])
    assert cfg.sprout.dirichlet_alpha == 0.05
    assert cfg.eval.attacks == ["pgd20", "autoattack"]
    assert cfg.train.bf16 is True
    assert Path(cfg.storage.path).is_absolute()
    flat = cfg.flat()
    assert flat["sprout.dirichlet_alpha"] == 0.05 and flat["method"] == "sprout"


def _run_cli(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


@pytest.mark.parametrize(("overrides", "fragment"), BAD_SETS, ids=[" ".join(o) for o, _ in BAD_SETS])
def test_bad_set_exits_2_with_one_line(overrides, fragment, tmp_path, monkeypatch, capsys) -> None:
    argv = ["train", str(DIGITS), f"--set=storage.path={tmp_path / 'rr'}"] + [f"--set={o}" for o in overrides]
    code, err = _run_cli(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert fragment in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "rr").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("content", "fragment"), BAD_FILES, ids=[f for _, f in BAD_FILES])
def test_bad_file_exits_2_with_one_line(content, fragment, tmp_path, monkeypatch, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    code, err = _run_cli(["validate", str(cfg)], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_config_file_and_bad_usage(tmp_path, monkeypatch, capsys) -> None:
    code, err = _run_cli(["train", str(tmp_path / "nope.yaml")], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "nope.yaml" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2
    assert len([x for x in capsys.readouterr().err.splitlines() if x.strip()]) == 1
    code, err = _run_cli(["compare", str(DIGITS), "--methods", "natural,madry"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "madry" in err[0]
    code, err = _run_cli(["sweep", str(DIGITS), "--space", "nope"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "nope" in err[0]


def test_cli_subprocess_exit_code_and_no_ray(tmp_path: Path) -> None:
    """The real console script: exit 2, one stderr line, nothing written, no Ray started."""
    import os

    work, ray_tmp = tmp_path / "work", tmp_path / "ray-tmp"
    work.mkdir()
    ray_tmp.mkdir()
    # the default MLflow store (./mlflow.db) and a Ray temp dir that any Ray start would fill
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", str(DIGITS), "--set", "sprout.dirichlet_alpha=7"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "sprout.dirichlet_alpha" in lines[0] and "[0, 1]" in lines[0]
    assert list(work.iterdir()) == [] and list(ray_tmp.iterdir()) == []


def test_validate_prints_resolved_config_and_plan(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(DIGITS), "--set", "scaling.num_workers=2"]) == 0
    out = capsys.readouterr().out
    assert "resource plan: 2 worker(s)" in out
    assert yaml.safe_load(out)["scaling"]["num_workers"] == 2
    assert not (tmp_path / "mlflow.db").exists()


def test_config_error_type() -> None:
    with pytest.raises(ConfigError, match="unknown key 'sprout.nope'"):
        load_config(DIGITS, ["sprout.nope=1"])


def test_linear_lr_scaling_by_global_batch() -> None:
    from orchestrator.worker import optim_config, scaled_lr

    cfg = load_config(DIGITS, ["train.lr=0.1", "train.lr_reference_batch=256", "data.batch_size=128",
                               "train.grad_accum=2"])
    assert scaled_lr(cfg, world=4) == pytest.approx(0.1 * 128 * 4 * 2 / 256)
    assert optim_config(cfg, 4).lr == pytest.approx(0.4)
    assert scaled_lr(load_config(DIGITS, ["train.lr=0.1"]), world=8) == 0.1


# ------------------------------------------------------------------ issue 13: defaults and new keys

# (what, built value, SPEC §2/§3 value)
def _spec_defaults() -> list[tuple[str, object, object]]:
    from trainables.evaluation import EvalConfig as SuiteConfig
    from trainables.methods import build_method

    cfg = load_config(None, [])
    suite = SuiteConfig()

    def m(name):
        return build_method(name, {}, num_classes=10, lr=0.1).params

    free = build_method("free_at", {}, num_classes=10, lr=0.1)
    return [
        ("pgd_at.eps", m("pgd_at").eps, 8 / 255),
        ("pgd_at.steps", m("pgd_at").steps, 7),
        ("pgd_at.step_size", m("pgd_at").step_size, 2 / 255),
        ("pgd_at.random_start", m("pgd_at").random_start, True),
        ("trades.beta", m("trades").beta, 6.0),
        ("trades.eps", m("trades").eps, 0.031),
        ("trades.steps", m("trades").steps, 10),
        ("trades.step_size", m("trades").step_size, 0.007),
        ("free_at.replays (m)", m("free_at").replays, 8),
        ("free_at.eps", m("free_at").eps, 8 / 255),
        ("free_at epochs divided by m", free.epoch_divisor, 8),
        ("fgsm_rs.eps", m("fgsm_rs").eps, 8 / 255),
        ("fgsm_rs.step_size", m("fgsm_rs").step_size, 10 / 255),
        ("sprout.dirichlet_alpha", m("sprout").dirichlet_alpha, 0.01),
        ("sprout.dirichlet_scale", m("sprout").dirichlet_scale, 1.0),
        ("sprout.mixup_alpha", m("sprout").mixup_alpha, 0.2),
        ("sprout.gaussian_delta", m("sprout").gaussian_delta, 0.1),
        ("sprout.beta_lr (None = model lr)", m("sprout").beta_lr, None),
        ("eval.eps", cfg.eval.eps, 8 / 255),
        ("eval.autoattack_eps", cfg.eval.autoattack_eps, 8 / 255),
        ("eval.cw_l2_search_steps", cfg.eval.cw_l2_search_steps, 10),
        ("eval.cw_l2_max_iters", cfg.eval.cw_l2_max_iters, 1000),
        ("suite eps", suite.eps, 8 / 255),
        ("suite cw_l2_search_steps", suite.cw_l2_search_steps, 10),
        ("suite cw_l2_max_iter", suite.cw_l2_max_iter, 1000),
        ("suite step rule (2.5·ε/steps)", suite.step_size(8 / 255, 20), 2.5 * (8 / 255) / 20),
    ]


def test_every_spec_default_is_pinned() -> None:
    wrong = [(what, got, want) for what, got, want in _spec_defaults()
             if not (got == want if want is None or isinstance(want, bool) else got == pytest.approx(want))]
    assert not wrong, wrong


def test_spec_attack_starts_of_the_baselines(monkeypatch) -> None:
    """PGD-AT and FGSM-RS start uniformly in the ε-ball (U(−ε, ε)); TRADES at x + 0.001·N(0, I)."""
    import torch

    import trainables.methods.adversarial as adv
    from trainables.methods import build_method

    calls = []
    monkeypatch.setattr(adv, "pgd_linf", lambda model, x, y, **kw: calls.append(kw) or x)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(5, 1, 2, 2), torch.randint(3, (5,))
    for name in ("pgd_at", "fgsm_rs"):
        build_method(name, {}, num_classes=3, lr=0.1).loss(model, x, y)
    assert [(c["random_start"], c["steps"], c["eps"], c["step_size"]) for c in calls] == [
        (True, 7, 8 / 255, 2 / 255), (True, 1, 8 / 255, 10 / 255)]
    # TRADES with zero steps returns its starting point: clamp(x + 0.001·N(0, I))
    p = adv.TradesParams(steps=1, step_size=1e-12)
    torch.manual_seed(3)
    start = adv.trades_adversary(model, x, p)
    torch.manual_seed(3)
    want = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(start, want, atol=1e-9)


def test_checkpoint_metric_defaults_per_method() -> None:
    from orchestrator.config import checkpoint_metric
    from orchestrator.runner import _score_attr

    for method, want in (("natural", "val/clean_acc"), ("label_smoothing", "val/clean_acc"), ("sprout", "val/pgd_acc"),
                         ("pgd_at", "val/pgd_acc"), ("trades", "val/pgd_acc")):
        cfg = load_config(DIGITS, [f"method={method}"])
        assert cfg.train.checkpoint_metric is None
        assert checkpoint_metric(cfg) == want and _score_attr(cfg) == want, method
    cfg = load_config(DIGITS, ["method=natural", "train.checkpoint_metric=val/pgd_acc"])
    assert _score_attr(cfg) == "val/pgd_acc"  # an explicit choice wins
    for off in ("train.val_pgd_steps=0",):  # no PGD validation runs (eval.eps > 0 is enforced): clean it is
        cfg = load_config(DIGITS, ["method=sprout", off])
        assert checkpoint_metric(cfg) == _score_attr(cfg) == "val/clean_acc", off


def test_augment_defaults_per_dataset_and_is_an_mlflow_param() -> None:
    assert load_config(DIGITS).data.augment == "none"
    assert load_config(None, ["data.name=synthetic"]).data.augment == "none"
    cfg = load_config(None, ["data.name=cifar10", f"data.root={ROOT}"])
    assert cfg.data.augment == "standard" and cfg.flat()["data.augment"] == "standard"
    assert load_config(None, ["data.name=cifar10", f"data.root={ROOT}", "data.augment=none"]).data.augment == "none"
    for p in ("cifar10_vgg16", "cifar10_wrn", "paper_table2_vgg16", "paper_table7_ablation", "sprout_reference_code"):
        assert load_config(ROOT / "configs" / f"{p}.yaml", [f"data.root={ROOT}"]).data.augment == "standard", p


def test_validation_split_follows_split_seed_not_train_seed() -> None:
    from orchestrator.worker import datasets

    def val(*sets):
        return datasets(load_config(DIGITS, list(sets)), ("val",))["val"].tensors()[1]

    assert torch_equal(val("train.seed=0"), val("train.seed=7"))
    assert not torch_equal(val("data.split_seed=0"), val("data.split_seed=1"))


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_paper_presets_follow_the_paper() -> None:
    t2 = load_config(ROOT / "configs" / "paper_table2_vgg16.yaml", [f"data.root={ROOT}"])
    assert "pgd100" in t2.eval.attacks and t2.eval.restarts == 10
    assert t2.eval.eps == 0.03 and t2.eval.autoattack_eps == pytest.approx(8 / 255)
    t7 = (ROOT / "configs" / "paper_table7_ablation.yaml").read_text().splitlines()[0]
    assert "sprout_uniform_ls" in t7 and "label_smoothing" not in t7
    from orchestrator.compare import parse_methods, variant_overrides

    parse_methods(t7.split("--methods ")[1].split()[0])  # every listed variant exists
    assert variant_overrides("sprout_uniform_ls") == {
        "method": "sprout", "sprout.use_gaussian": False, "sprout.use_mixup": False, "sprout.use_dirichlet": False,
        "sprout.uniform_smoothing": True}
    ref = load_config(ROOT / "configs" / "sprout_reference_code.yaml", [f"data.root={ROOT}"])
    assert ref.train.milestones == (0.4, 0.7, 0.9) and ref.train.epochs == 200  # the 80/60/40/20 stages


def test_presets_never_request_transfer_without_a_source_outside_compare() -> None:
    from orchestrator.config import require_transfer_source

    for p in PRESETS:
        first = p.read_text().splitlines()[0]
        cfg = load_config(p, [f"data.root={ROOT}"] if yaml.safe_load(p.read_text()).get("data", {}).get("root") else [])
        if first.startswith("# sprout train"):
            require_transfer_source(cfg)  # a train-first preset runs as it is
    cfg = load_config(DIGITS, ["eval.transfer_source=some-run-id"])
    require_transfer_source(cfg)
    with pytest.raises(ConfigError, match="eval.transfer_source"):
        require_transfer_source(load_config(DIGITS))
