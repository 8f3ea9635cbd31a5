"""A self-contained HTML report: tables inline, plots embedded as data URIs."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence, Union

from stagecredit.reports.tables import Table
from stagecredit.storage.atomic import atomic_write_text

Section = Union[Table, Path, str]

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}.note{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee}.headline{font-size:1.1em;background:#fff7e0;padding:.6em 1em}
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        if isinstance(section, Table):
            parts.append(section.to_html())
        elif isinstance(section, Path):
            data = base64.b64encode(section.read_bytes()).decode("ascii")
            parts.append(f"<p><img alt='{html.escape(section.name)}' src='data:image/png;base64,{data}'></p>")
        else:
            parts.append(f"<p class='headline'>{html.escape(section)}</p>")
    parts.append("</body></html>")
    return "".join(parts)


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    parts = [f"# {title}", ""]
    for section in sections:
        if isinstance(section, Table):
            parts.append(section.to_markdown())
        elif isinstance(section, Path):
            parts.append(f"![{section.stem}]({section.name})\n")
        else:
            parts.append(f"**{section}**\n")
    return "\n".join(parts)


def write_report(out_dir: Path, title: str, sections: Sequence[Section]) -> tuple[Path, Path]:
    """Write ``summary.md`` and a self-contained ``report.html`` into ``out_dir``."""
    md, page = out_dir / "summary.md", out_dir / "report.html"
    atomic_write_text(md, render_markdown(title, sections))
    atomic_write_text(page, render_html(title, sections))
    return md, page
