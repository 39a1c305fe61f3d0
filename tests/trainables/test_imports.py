"""The training core is plain PyTorch: importing it pulls in neither Ray nor MLflow (SPEC §9)."""

from __future__ import annotations

import subprocess
import sys

IMPORTS = """
import trainables
from trainables import ATTACKS, DATASETS, METHODS, MODELS, dirichlet_targets
import trainables.loop, trainables.checkpoint, trainables.methods, trainables.sprout
import trainables.data, trainables.models, trainables.attacks
assert callable(dirichlet_targets)
print(len(METHODS), len(MODELS), len(DATASETS), len(ATTACKS))
"""
ASSERT = """
import sys
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))
assert not bad, bad
"""
CHECK = IMPORTS + ASSERT


def test_importing_trainables_imports_neither_ray_nor_mlflow():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    counts = [int(v) for v in r.stdout.split()]
    assert all(c > 0 for c in counts)


def test_the_check_would_catch_an_import():
    """The subprocess check is not vacuous: importing ray's name makes it fail."""
    probe = "import sys, types; sys.modules['ray.train'] = types.ModuleType('ray.train')\n" + ASSERT
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ray" in r.stderr


def test_registries_hold_the_spec_names():
    from trainables import ATTACKS, DATASETS, METHODS, MODELS

    assert {"natural", "label_smoothing", "sprout", "pgd_at", "trades", "free_at", "fgsm_rs"} <= set(METHODS)
    assert {"small_cnn", "vgg16", "wrn", "preact_resnet18", "resnet50", "resnet152"} <= set(MODELS)
    assert {"digits", "synthetic", "cifar10", "imagenet"} <= set(DATASETS)
    assert {"pgd", "fgsm_rs"} <= set(ATTACKS)
