"""report.html from report.md: one source of truth, rendered for MLflow's artifact viewer.

MLflow shows a Markdown artifact as plain text (its image links stay text, wide tables are cut) but renders an
HTML artifact in a frame. That frame cannot fetch the run's other artifacts by relative path, so every image is
embedded as base64. Only the Markdown that report.py and report_study.py write is understood: headings, paragraphs,
`>` quotes, pipe tables, images on a line of their own, `code`, **bold**. Anything else passes through as text.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

# Tables wrap their cells and scroll sideways inside their own box instead of being cut at the frame's edge.
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 1.5em auto;
       padding: 0 1em; line-height: 1.45; color: #222; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: 90%; }
blockquote { border-left: 4px solid #e0a000; background: #fff8e5; margin: 1em 0; padding: .4em .9em; }
.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def inline(text: str) -> str:
    """Escaped text with `code` and **bold**; code spans are cut out first so that ** inside them stays literal."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().removeprefix("|").removesuffix("|").split("|")]


def _table(rows: list[str]) -> str:
    head, body = _cells(rows[0]), [_cells(r) for r in rows[2:]]
    th = "".join(f"<th>{inline(c)}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>\n" for r in body)
    return f'<div class="table"><table>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{trs}</tbody></table></div>'


def _image(alt: str, src: str, folder: Path | None) -> str:
    """An <img> with the file embedded; a file that is missing says so instead of a broken link."""
    path = (folder / src) if folder is not None else Path(src)
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return f"<p><em>(image {html.escape(src)} not found)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt, quote=True)}" src="data:{mime};base64,{data}"></p>'


def to_html(md: str, folder: Path | None = None, title: str = "report") -> str:
    """The whole page for the Markdown text `md`; images are read from `folder` (report.md's own folder)."""
    lines, out, i = md.splitlines(), [], 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
            i += 1
        elif m := _IMAGE.match(line.strip()):
            out.append(_image(m["alt"], m["src"], folder))
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip()):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
        elif line.startswith(">"):
            j = i
            while j < len(lines) and lines[j].startswith(">"):
                j += 1
            text = " ".join(ln.removeprefix(">").strip() for ln in lines[i:j])
            out.append(f"<blockquote><p>{inline(text)}</p></blockquote>")
            i = j
        else:  # a paragraph: consecutive lines up to a blank one or the start of another block
            j = i + 1
            while (j < len(lines) and lines[j].strip() and not lines[j].startswith(("#", ">", "|"))
                   and not _IMAGE.match(lines[j].strip())):
                j += 1
            out.append(f"<p>{inline(' '.join(ln.strip() for ln in lines[i:j]))}</p>")
            i = j
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
