"""reports/index.html: one self-contained page (no network) with the whole reproduction.

The page holds everything inline: the CSS in a ``<style>`` element, every image as a base64
``data:image/png`` URI, no script and no external link, so it opens offline, can be mailed
as one file and prints (``@media print``). :func:`render_page` turns the collected parts
(:class:`Page`, see pipeline.report.page for where they come from) into the HTML text; the
tables are the report stage's own Markdown files, converted by :func:`markdown_to_html`, so
whatever columns and notes they carry appear here too.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import re

import numpy as np

from pipeline.config import STAND_IN_NOTE

MIN_SIDE = 32  # smallest displayed image side in pixels (as pipeline.sampling.figures)
PAD = 2  # white pixels between tiles
MAX_SIDE = 1200  # larger embedded images are scaled down to this many pixels (compact)
MAX_BYTES = 400_000  # embedded images above this size are compacted


@dataclasses.dataclass
class Figure:
    """One image of the page: PNG bytes (None: not produced, said in its place), a caption."""

    title: str
    png: bytes | None
    caption: str = ""
    stand_in: bool = False


@dataclasses.dataclass
class VariantPart:
    """A variant's figures: its sample grid (shown beside the real grid) and the others."""

    name: str
    label: str  # e.g. "eps prediction, fixed variance, L_simple"
    grid: Figure
    figures: list[Figure]
    note: str = ""  # e.g. the checkpoint selection, the sampler


@dataclasses.dataclass
class Page:
    """Everything the page shows, in order: facts, tables (Markdown), variants, plots."""

    title: str
    stand_in_note: str | None  # the scale's stand-in label with its reasons, None if none
    facts: list[tuple[str, str]]
    tables_md: list[str]
    real_grid: Figure
    variants: list[VariantPart]
    plots: list[Figure]


# ---------------------------------------------------------------------------------------------
# Images


def data_uri(image: bytes) -> str:
    """``image`` (PNG, or JPEG from :func:`compact`) as a ``data:image/...;base64,`` URI."""
    kind = "jpeg" if image[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(image).decode("ascii")


def compact(png: bytes, max_side: int = MAX_SIDE, max_bytes: int = MAX_BYTES) -> bytes:
    """``png`` as it is when it is small; else scaled down to ``max_side`` pixels and, if still
    over ``max_bytes``, as JPEG (quality 88): LSUN's 256x256 grids would make a page of tens of
    MB. The figures on disk and in MLflow keep their full size."""
    from PIL import Image

    if len(png) <= max_bytes:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    if out.tell() <= max_bytes:
        return out.getvalue()
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    return out.getvalue()


def image_grid_png(images: np.ndarray, nrow: int | None = None) -> bytes:
    """uint8 images [N, R, R, 3] tiled ``nrow`` per row (default: a square-ish grid), each
    enlarged by an integer factor to at least MIN_SIDE pixels, PAD white pixels between, as PNG
    bytes (the layout of the sample stage's grid.png)."""
    from PIL import Image

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise TypeError(f"expected uint8 images [N, R, R, 3], got {images.dtype} {images.shape}")
    n, r = len(images), images.shape[1]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    k = max(1, math.ceil(MIN_SIDE / r))
    big = images.repeat(k, axis=1).repeat(k, axis=2)
    side = r * k
    rows = math.ceil(n / nrow)
    canvas = np.full((PAD + rows * (side + PAD), PAD + nrow * (side + PAD), 3), 255, np.uint8)
    for i, image in enumerate(big):
        y, x = PAD + (i // nrow) * (side + PAD), PAD + (i % nrow) * (side + PAD)
        canvas[y : y + side, x : x + side] = image
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, format="PNG")
    return out.getvalue()


def line_plot_png(
    series: dict[str, tuple[list[float], list[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
) -> bytes | None:
    """A line plot of ``series`` {label: (x, y)} as PNG bytes; None when no series has a point."""
    series = {k: v for k, v in series.items() if len(v[0])}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, marker="o" if len(x) < 12 else None, markersize=3)
    if logy and all(v > 0 for _, y in series.values() for v in y):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Markdown (the report stage's tables) to HTML


def _inline(text: str) -> str:
    """Escape ``text`` and turn **bold**, *italic* and `code` into HTML."""
    out = html.escape(text.replace("\\|", "|"), quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` is a literal pipe inside a cell)."""
    body = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def markdown_to_html(md: str) -> str:
    """The subset of Markdown the report writes: headings, pipe tables, lists, paragraphs."""
    out: list[str] = []
    lines = md.splitlines()
    bullet = re.compile(r"^\s*[-*]\s+")
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            level = min(len(heading.group(1)) + 1, 6)  # the page's h1 is its title
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
        elif bullet.match(line):
            items = []
            while i < len(lines) and bullet.match(lines[i]):
                items.append(f"<li>{_inline(bullet.sub('', lines[i]))}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while (
                i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("|", "#"))
            ):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _table(rows: list[str]) -> str:
    header, body = _cells(rows[0]), rows[1:]
    if body and re.fullmatch(r"[\s|:-]+", body[0]):
        body = body[1:]  # the --- separator row
    numeric = re.compile(r"^[-+−]?\d[\d,.]*(e[-+]?\d+)?$|^—$")
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    trs = []
    for row in body:
        cells = _cells(row)
        tds = "".join(
            f'<td class="num">{_inline(c)}</td>' if numeric.match(c) else f"<td>{_inline(c)}</td>"
            for c in cells
        )
        cls = ' class="stand-in"' if STAND_IN_NOTE in row else ""
        trs.append(f"<tr{cls}>{tds}</tr>")
    return (
        '<div class="table-wrap"><table><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(trs)
        + "</tbody></table></div>"
    )


# ---------------------------------------------------------------------------------------------
# The page

CSS = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --warn: #9a6700; --warnbg: #fff8c5; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--fg); margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 1400px; }
h1 { font-size: 1.6rem; margin: .3rem 0 .6rem; }
h2 { font-size: 1.3rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem;
  margin-top: 2rem; }
h3 { font-size: 1.1rem; margin: 1.4rem 0 .4rem; }
nav { font-size: .9rem; margin: .4rem 0 1rem; }
nav a { margin-right: 1rem; }
.banner { background: var(--warnbg); border: 1px solid #d4a72c; color: var(--warn);
  padding: .5rem .8rem; border-radius: 6px; font-weight: 600; }
.badge { display: inline-block; background: var(--warnbg); color: var(--warn);
  border: 1px solid #d4a72c; border-radius: 4px; font-size: .75rem; padding: 0 .35rem;
  font-weight: 600; vertical-align: middle; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem;
  font-size: .9rem; margin: .8rem 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-all; }
.table-wrap { overflow-x: auto; margin: .5rem 0; }
table { border-collapse: collapse; font-size: .82rem; }
th, td { border: 1px solid var(--line); padding: .25rem .45rem; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.stand-in td { background: #fffdf0; }
td:last-child { min-width: 15rem; }  /* the note: wide tables scroll instead of squeezing it */
.row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: .4rem 0; page-break-inside: avoid; break-inside: avoid; }
figure img { max-width: 100%; height: auto; image-rendering: pixelated;
  border: 1px solid var(--line); }
figcaption { font-size: .82rem; color: var(--muted); max-width: 36rem; }
.missing { font-size: .85rem; color: var(--muted); border: 1px dashed var(--line);
  padding: .6rem; }
.note { font-size: .85rem; color: var(--muted); }
section.variant { page-break-inside: avoid; break-inside: avoid; }
@media print {
  body { font-size: 10pt; max-width: none; padding: 0; }
  nav { display: none; }
  table { font-size: 7.5pt; }
  .table-wrap { overflow: visible; }
  td:last-child { min-width: 12rem; }
  h2 { page-break-before: always; break-before: page; }
  h2:first-of-type { page-break-before: avoid; break-before: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""


def _figure(fig: Figure) -> str:
    badge = ' <span class="badge">stand-in</span>' if fig.stand_in else ""
    title = f"<strong>{html.escape(fig.title)}</strong>{badge}"
    caption = f"{title}<br>{html.escape(fig.caption)}" if fig.caption else title
    if fig.png is None:
        missing = '<div class="missing">not produced</div>'
        return f"<figure>{missing}<figcaption>{caption}</figcaption></figure>"
    alt = html.escape(fig.title, quote=True)
    return (
        f'<figure><img src="{data_uri(fig.png)}" alt="{alt}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _variant(part: VariantPart, real: Figure) -> str:
    name = html.escape(part.name)
    out = [f'<section class="variant" id="v-{name}">']
    out.append(f"<h3>{name} <span class='note'>({html.escape(part.label)})</span></h3>")
    if part.note:
        out.append(f'<p class="note">{html.escape(part.note)}</p>')
    out.append('<div class="row">' + _figure(part.grid) + _figure(real) + "</div>")
    out.append('<div class="row">' + "".join(_figure(f) for f in part.figures) + "</div>")
    out.append("</section>")
    return "\n".join(out)


def render_page(page: Page) -> str:
    """The whole HTML document of ``page`` (UTF-8 text, self-contained)."""
    sections = [("tables", "Tables"), ("samples", "Samples and figures"), ("curves", "Curves")]
    nav = " ".join(f'<a href="#{k}">{v}</a>' for k, v in sections)
    nav += " " + " ".join(
        f'<a href="#v-{html.escape(p.name)}">{html.escape(p.name)}</a>' for p in page.variants
    )
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in page.facts)
    banner = ""
    if page.stand_in_note:
        banner = (
            f'<p class="banner">Every number and figure on this page: '
            f"{html.escape(page.stand_in_note)}.</p>"
        )
    body = [
        f"<h1>{html.escape(page.title)}</h1>",
        banner,
        f"<nav>{nav}</nav>",
        f'<dl class="facts">{facts}</dl>',
        '<h2 id="tables">Tables</h2>',
        *(markdown_to_html(md) for md in page.tables_md),
        '<h2 id="samples">Samples and figures</h2>',
        '<p class="note">Each variant: its samples beside real training images, then the '
        "progressive generation (Fig. 6), reconstructions (Fig. 7), interpolations (Fig. 8) "
        "and distortion against rate (Fig. 5) where the evaluate stage made them.</p>",
        *(_variant(p, page.real_grid) for p in page.variants),
        '<h2 id="curves">Curves</h2>',
        '<div class="row">' + "".join(_figure(f) for f in page.plots) + "</div>",
    ]
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(page.title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")  # any locale's encoding
