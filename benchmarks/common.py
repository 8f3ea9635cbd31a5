"""Helpers shared by the benchmark scripts: where results go and how tables are written."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from stagecredit.reports.tables import Table  # noqa: E402
from stagecredit.storage.atomic import atomic_write_json, atomic_write_text  # noqa: E402


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}


def write_results(name: str, only: list[str] | None, payload: dict, tables: list[Table]) -> None:
    """Write ``results/<name>.json`` and ``.md``, naming the command that re-makes them."""
    command = f"python benchmarks/{name}.py" + "".join(f" --only {n}" for n in only or [])
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", {"command": command, "machine": machine(), **payload})
    body = [f"# {name}", "", f"Made by `{command}` on {machine()}.", ""] + [t.to_markdown() for t in tables]
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(body))
