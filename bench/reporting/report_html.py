"""report.md -> a self-contained report.html (images embedded as base64), and a PNG of it via headless Chromium.

The HTML is converted from the markdown report rather than rendered separately, so a section anyone adds to
report.md shows up in the HTML too. The converter covers the markdown the bench writes: headings, paragraphs,
pipe tables, bullet lists, fenced code, images, links, `code`, **bold**, and raw HTML lines (<details>, <br>).
"""
from __future__ import annotations

import base64
import html
import mimetypes
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.runner import store

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; }
h1 { border-bottom: 2px solid #111; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #999; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #888; padding: .3em .55em; vertical-align: top; text-align: left; }
th { background: #e8e8e8; }
tr:nth-child(even) td { background: #f6f6f6; }
code { font: 12.5px/1.3 ui-monospace, Menlo, Consolas, monospace; background: #f0f0f0; padding: 0 .2em; }
pre { background: #f4f4f4; border: 1px solid #ccc; padding: .7em; overflow-x: auto; font-size: 12px; }
pre code { background: none; padding: 0; }
img { max-width: 100%; }
td img { width: 150px; image-rendering: pixelated; display: block; }
p > img { image-rendering: pixelated; }
details { margin: .3em 0; } summary { cursor: pointer; }
.missing { color: #a00; font-style: italic; }
"""

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}")
_ALLOWED_TAGS = re.compile(r"&lt;(/?)(br|sub|sup|b|i|em|strong)\s*/?&gt;")


_INCLUDE = re.compile(r"^<!--\s*include-yaml:\s*([^|]+?)\s*\|\s*(.*?)\s*-->$")


def _included_yaml(path: Path, label: str) -> str:
    """A collapsible holding a file's text (the full resolved configs: in the HTML only, report.md links them)."""
    if not path.is_file():
        return f'<p class="missing">[missing file: {html.escape(str(path.name))}]</p>'
    return (f"<details><summary>full config of <code>{html.escape(label)}</code> ({html.escape(path.parent.name)}/"
            f"{html.escape(path.name)})</summary><pre><code class=\"language-yaml\">{html.escape(path.read_text())}"
            "</code></pre></details>")


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _inline(text: str, base_dir: Path) -> str:
    """Escape text and apply inline markup; code spans are protected from the other rules."""
    spans: list[str] = []

    def keep(fragment: str) -> str:
        spans.append(fragment)
        return f"\x00{len(spans) - 1}\x00"

    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        path = (base_dir / src) if not re.match(r"^[a-z]+:", src) else None
        if path is not None and path.is_file():
            return keep(f'<img alt="{html.escape(alt)}" title="{html.escape(alt)}" src="{data_uri(path)}">')
        return keep(f'<span class="missing">[missing image: {html.escape(src)}]</span>')

    text = _CODE.sub(lambda m: keep(f"<code>{html.escape(m.group(1))}</code>"), text)
    text = _IMAGE.sub(image, text)
    text = html.escape(text, quote=False)
    text = _ALLOWED_TAGS.sub(lambda m: f"<{m.group(1)}{m.group(2)}>", text)
    text = _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', text)
    text = _BOLD.sub(r"<strong>\1</strong>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: spans[int(m.group(1))], text)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def markdown_to_html(md: str, base_dir: Path, title: str) -> str:
    """The bench's markdown as one self-contained HTML page; relative image paths resolve against base_dir."""
    lines = md.splitlines()
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para), base_dir)}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            lang = stripped[3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            code = html.escape("\n".join(lines[i + 1:j]))
            out.append(f'<pre><code class="language-{html.escape(lang)}">{code}</code></pre>')
            i = j + 1
            continue
        if not stripped:
            flush()
        elif m := _INCLUDE.match(stripped):
            flush()
            out.append(_included_yaml(base_dir / m.group(1).strip(), m.group(2).strip()))
        elif stripped.startswith("<"):
            flush()
            out.append(stripped)  # raw HTML the bench writes (<details>, <summary>)
        elif m := re.match(r"^(#{1,6})\s+(.*)$", stripped):
            flush()
            level, text = len(m.group(1)), m.group(2)
            out.append(f'<h{level} id="{_slug(text)}">{_inline(text, base_dir)}</h{level}>')
        elif stripped.startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip()):
            flush()
            head = _cells(stripped)
            rows = []
            i += 2
            # A header and separator row right after a table start a new table (GFM would make them data rows).
            while i < len(lines) and lines[i].strip().startswith("|") and not (
                    i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip())):
                rows.append(_cells(lines[i]))
                i += 1
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c, base_dir)}</th>" for c in head)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{_inline(c, base_dir)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</tbody></table>")
            continue
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while i < len(lines) and re.match(r"^[-*]\s+", lines[i].strip()):
                items.append(re.sub(r"^[-*]\s+", "", lines[i].strip()))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t, base_dir)}</li>" for t in items) + "</ul>")
            continue
        else:
            para.append(stripped)
        i += 1
    flush()
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_html(md_path: Path, html_path: Path | None = None) -> Path:
    """report.md -> report.html next to it (or at html_path), images embedded."""
    md_path = Path(md_path)
    html_path = Path(html_path) if html_path is not None else md_path.with_suffix(".html")
    md = md_path.read_text()
    title = next((ln[2:].strip() for ln in md.splitlines() if ln.startswith("# ")), md_path.stem).replace("`", "")
    store.atomic_write_text(html_path, markdown_to_html(md, md_path.parent, title))
    return html_path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def render_png(html_path: Path, png_path: Path, width: int = 1400, height: int = 4000, timeout: float = 120) -> Path:
    """A screenshot of the page's top `height` pixels with headless Chromium (Debian: apt-get install chromium)."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found; install it (Debian: apt-get install chromium)")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png_path}", Path(html_path).resolve().as_uri()],
                       check=True, capture_output=True, timeout=timeout)
    if not png_path.exists():
        raise RuntimeError(f"Chromium did not write {png_path}")
    return png_path
