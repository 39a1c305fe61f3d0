"""The search-space registry and the schema check of its keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from trainables.registry import Registry

SPACES: Registry = Registry("search space")


class SearchSpaceError(ValueError):
    """A search-space key that is not a config field."""


def config_keys() -> set[str]:
    """Every dotted leaf key of the experiment config schema."""
    from orchestrator.config import ExperimentConfig

    keys: set[str] = set()

    def walk(model: Any, prefix: str) -> None:
        if hasattr(model, "model_fields"):
            fields = {n: f.annotation for n, f in model.model_fields.items()}
        elif dataclasses.is_dataclass(model):
            fields = {f.name: f.type for f in dataclasses.fields(model)}
        else:
            keys.add(prefix.rstrip("."))
            return
        for n, ann in fields.items():
            sub = ann if (hasattr(ann, "model_fields") or dataclasses.is_dataclass(ann)) else None
            if sub is not None and isinstance(sub, type):
                walk(sub, f"{prefix}{n}.")
            else:
                keys.add(f"{prefix}{n}")

    walk(ExperimentConfig, "")
    return keys


def check_keys(name: str, space: dict[str, Any]) -> None:
    known = config_keys()
    bad = sorted(k for k in space if k not in known)
    if bad:
        near = sorted(k for k in known if k.split(".")[0] == bad[0].split(".")[0])
        hint = f"; keys in {bad[0].split('.')[0]!r}: {', '.join(near)}" if near else ""
        raise SearchSpaceError(f"search space {name!r}: {bad[0]!r} is not a config field{hint}")


def load_space(name: str) -> dict[str, Any]:
    if name not in SPACES:
        raise SearchSpaceError(f"unknown search space {name!r}; expected one of: {', '.join(SPACES)}")
    space = SPACES[name]()
    check_keys(name, space)
    return space
