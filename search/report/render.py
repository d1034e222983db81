"""runs/<study-name>/report.md and report.html: one document, two renderings.

The report is assembled as a list of blocks (heading, text, table, code, image) by
`search.report.content`; this module renders them to Markdown (images beside it in
figures/) and to a self-contained HTML page (images embedded as base64).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str  # may hold **bold** and `code`, rendered in both formats


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Image:
    path: Path  # a PNG under the run directory
    caption: str


Block = Heading | Text | Table | Code | Image


def to_markdown(blocks: list[Block], base: Path) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Table):
            out.append("| " + " | ".join(block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                    for row in block.rows]
        elif isinstance(block, Code):
            out.append("```\n" + block.text.rstrip() + "\n```")
        elif isinstance(block, Image):
            out.append(f"![{block.caption}]({block.path.relative_to(base).as_posix()})")
        out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render **bold** and `code` spans."""
    parts = html.escape(text).split("`")
    for i in range(1, len(parts), 2):
        parts[i] = f"<code>{parts[i]}</code>"
    rendered = "".join(parts)
    pieces = rendered.split("**")
    for i in range(1, len(pieces), 2):
        pieces[i] = f"<strong>{pieces[i]}</strong>"
    return "".join(pieces)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f6f6;padding:.7rem;overflow-x:auto;font-size:.85rem}
code{background:#f1f1f1;padding:0 .2rem} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
"""


def to_html(blocks: list[Block], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            out.append(f"<h{level}>{html.escape(block.text)}</h{level}>")
        elif isinstance(block, Text):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Code):
            out.append(f"<pre>{html.escape(block.text.rstrip())}</pre>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(block.caption)}' "
                       f"src='data:image/png;base64,{data}'><figcaption>"
                       f"{html.escape(block.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write(blocks: list[Block], directory: Path, title: str) -> tuple[Path, Path]:
    md, page = directory / "report.md", directory / "report.html"
    md.write_text(to_markdown(blocks, directory), encoding="utf-8")
    page.write_text(to_html(blocks, title), encoding="utf-8")
    return md, page
