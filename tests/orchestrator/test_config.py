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
    (["scaling.num_workers=64"], "scaling"),
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
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", str(DIGITS), "--set", "sprout.dirichlet_alpha=7"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "sprout.dirichlet_alpha" in lines[0] and "[0, 1]" in lines[0]
    assert list(tmp_path.iterdir()) == []


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
