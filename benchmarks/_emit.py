"""Shared ending of the benchmark scripts: print the table, keep the numbers as JSON."""

from __future__ import annotations

import json
from typing import Any


def emit(res: dict[str, Any], table: str, dest: str | None) -> int:
    """Print ``table``; write ``res`` as JSON to ``dest`` (``-``: stdout, None: nowhere)."""
    print(table)
    if dest:
        text = json.dumps(res, indent=2)
        if dest == "-":
            print(text)
        else:
            with open(dest, "w") as f:
                f.write(text + "\n")
    return 0
