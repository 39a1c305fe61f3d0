"""Named Ray Tune search spaces over config keys (SPEC §1.2, paper Fig. 5).

A space is a function returning {dotted config key: Tune domain}; every key is checked
against the config schema when the space is loaded, so a typo fails before Ray starts.
Adding a space is one module with one ``@SPACES.register`` line.
"""

from __future__ import annotations

from typing import Any

from search_spaces import baselines, sensitivity, sprout_random  # noqa: E402,F401  (register)
from search_spaces.registry import SPACES, SearchSpaceError, load_space

__all__ = ["SPACES", "SearchSpaceError", "load_space"]


def describe(name: str) -> dict[str, Any]:
    return {k: repr(v) for k, v in load_space(name).items()}
