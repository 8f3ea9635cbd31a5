"""Tables that render the same content as Markdown, HTML and a terminal (rich) table."""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any, Sequence


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:+.{digits}f}" if digits >= 0 else f"{value:.3g}"
    return str(value)


@dataclasses.dataclass
class Table:
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    note: str = ""

    def cells(self) -> list[list[str]]:
        return [[fmt(v) if isinstance(v, float) else str(v) for v in row] for row in self.rows]

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.cells()]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.cells())
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table as RichTable

        console = console or Console()
        table = RichTable(title=self.title, title_justify="left", caption=self.note or None, caption_justify="left")
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in self.cells():
            table.add_row(*row)
        console.print(table)


def _unsigned(value: float) -> str:
    """Correlations read as plain numbers; only effects carry an explicit sign."""
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def row_level(labels) -> str:
    """``"stage/source"`` when the rows are data sources, else ``"stage"`` ('/' only ever joins stage and source)."""
    return "stage/source" if any("/" in s for s in labels) else "stage"


def epsilon_removal(ceilings) -> str:
    """How the scaled partial removal of the ceilings is described: of a stage, or of a source."""
    if row_level(ceilings.stages) == "stage/source":
        return (f"retraining with the source kept at weight 1 − ε (ε = {ceilings.epsilon:g}), scaled by 1/ε — the "
                "quantity first-order estimators approximate")
    return (f"retraining after removing only ε = {ceilings.epsilon:g} of the stage, scaled by 1/ε — the quantity "
            "first-order estimators approximate")


_NONE_MEANS = {"curvature": "default", "segment_steps": "the checkpoint interval", "max_segments": "no limit",
               "curvature_examples": "all", "max_tangents": "all"}


def settings_note(settings: dict) -> str:
    """One sentence naming aa-curvature's options (``Attribution.settings``), or ``""`` where it took none."""
    options = settings.get("curvature_options")
    if not options:
        return ""
    shown = ", ".join(f"{k}={_NONE_MEANS.get(k, 'none') if v is None else v}" for k, v in options.items()
                      if k != "resolved_curvature")
    return f"aa-curvature settings: {shown}."


def validation_table(report) -> Table:
    derivative = report.ceilings is not None
    rows = [
        [r["stage"], r["method"], r["mode"], _unsigned(r["pearson"]), _unsigned(r["spearman"]),
         f"{r['sign_agreement']:.3f}", r["mean_estimate"], r["mean_retrained"], f"{r['seconds']:.3f}",
         f"{r['retrain_seconds']:.2f}"] + ([_unsigned(r["pearson_derivative"])] if derivative else [])
        for r in report.rows
    ]
    return Table(
        title=f"Estimators vs retraining — {report.behaviour}",
        columns=["stage", "method", "mode", "Pearson r", "Spearman ρ", "sign agreement", "mean τ̂", "mean τ (retrain)",
                 "estimator s", "retrain s"] + (["r vs ε-removal"] if derivative else []),
        rows=rows,
        note=f"Correlations are across the {len(report.truth.final_values)} behaviour values. {report.sign_convention} "
             + "".join(f"{n} " for n in report.truth.notes) + "Seconds are wall-clock on this machine."
             + (f" r vs ε-removal: Pearson r with {epsilon_removal(report.ceilings)}." if derivative else "")
             + "".join(f" {note}" for note in dict.fromkeys(  # once per method, not per mode
                 settings_note(a.settings) for a in report.attributions if a.settings)),
    )


def ceilings_table(ceilings, title: str | None = None) -> Table:
    """Per stage: how reproducible and how linear the retraining ground truth is."""
    level = row_level(ceilings.stages)
    return Table(
        title=title or "How well any estimate can agree with retraining",
        columns=[level, "reproducibility", "ceiling", "linearity", "reading"],
        rows=[[s, _unsigned(float(ceilings.reproducibility[k])), _unsigned(float(ceilings.ceiling[k])),
               _unsigned(float(ceilings.linearity[k])), reading]
              for k, (s, reading) in enumerate(zip(ceilings.stages, ceilings.readings()))],
        note=f"reproducibility: Pearson r between retraining without the {level} and retraining again from a "
             f"start of its stage nudged by {ceilings.nudge:g}·‖Δ_k‖ in a random direction; ceiling = "
             f"√reproducibility, what an estimate can expect if the rest is noise. linearity: Pearson r between "
             f"{epsilon_removal(ceilings)}, and removing all of it — what a perfect estimate of that quantity "
             f"would score.",
    )


def validation_tables(report) -> list[Table]:
    """The estimators-vs-retraining table, and the ceilings table when the report measured them."""
    return [validation_table(report)] + ([ceilings_table(report.ceilings)] if report.ceilings is not None else [])


def validation_markdown(report) -> str:
    return "\n".join(t.to_markdown() for t in validation_tables(report))


def verdict(effect: float, higher_is_better: bool = False) -> str:
    if effect == 0 or math.isnan(effect):
        return "none"
    return "credit" if (effect > 0) == higher_is_better else "blame"


def effects_table(att, title: str | None = None, unit: str = "") -> Table:
    totals = att.totals()
    rows = [[stage, float(totals[k]), verdict(float(totals[k]), att.higher_is_better)] for k, stage in enumerate(att.stages)]
    level = row_level(att.stages)
    return Table(
        title=title or f"Mean {'source' if '/' in level else 'stage'} effect on {att.behaviour} ({att.method}, {att.mode})",
        columns=[level, f"mean τ̂ {unit}".strip(), "verdict"],
        rows=rows,
        note=" ".join([att.sign_convention, *att.notes] + ([settings_note(att.settings)] if att.settings else [])),
    )
