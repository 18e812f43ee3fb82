"""Study reports, shared by the downstream studies and the reconstruction studies: one markdown file
and one self-contained HTML file (plots embedded as base64 PNG).

A study builds a :class:`Report` of headings, paragraphs, tables and images; :func:`write_report`
renders both files into the run folder. ``downstream report <run>`` re-renders a finished (or
partly finished) downstream study from its ``config.yaml`` and ``trials.csv``.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame.astype(str)))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (Path(path), caption)))


def markdown_table(frame: pd.DataFrame) -> str:
    cells = frame.astype(str).map(lambda s: s.replace("|", "\\|"))
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(report: Report, run_dir: Path) -> str:
    out = [f"# {report.title}", ""]
    for kind, value in report.blocks:
        if kind == "h":
            out += [f"## {value}", ""]
        elif kind == "p":
            out += [str(value), ""]
        elif kind == "table":
            out += [markdown_table(value), ""]
        else:
            path, caption = value
            out += [f"![{caption}]({path.resolve().relative_to(run_dir.resolve()).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(out)


def render_html(report: Report) -> str:
    body = [f"<h1>{html.escape(report.title)}</h1>"]
    for kind, value in report.blocks:
        if kind == "h":
            body.append(f"<h2>{html.escape(str(value))}</h2>")
        elif kind == "p":
            body.append(f"<p>{html.escape(str(value))}</p>")
        elif kind == "table":
            body.append(value.to_html(index=False, escape=True, border=0, classes="results"))
        else:
            path, caption = value
            data = base64.b64encode(path.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"/>'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table.results{border-collapse:collapse}"
             "table.results td,table.results th{border:1px solid #ccc;padding:.2em .6em}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(report: Report, run_dir: Path) -> tuple[Path, Path]:
    """``report.md`` (plots linked from ``plots/``) and ``report.html`` (plots embedded)."""
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(render_markdown(report, run_dir))
    page.write_text(render_html(report))
    return md, page
