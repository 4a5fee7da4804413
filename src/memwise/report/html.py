"""The HTML report: one self-contained page (inline CSS, the plot as a data URI, no scripts).

Every piece of text from the result is HTML-escaped, and the page's Content-Security-Policy
allows no script and no external resource, so a hostile workload or module name is shown as text.

The interactive parts are inline SVG driven by CSS alone (`:hover`, and a checkbox for toggles),
so they work under the same no-script policy: hovering a point of the timeline shows its phase and
live bytes (and, for a `watch` result, the operator, module and source line of the allocation
there); a second result (an estimate beside a measurement) can be overlaid on the same timeline;
what-if rows are drawn as bars against the budget.
"""

import base64
from html import escape
from typing import Any

from memwise.core.units import format_bytes
from memwise.report.tables import (
    TableContent,
    assumptions_of,
    category_content,
    module_content,
    notes_of,
    peak_text,
    summary_content,
    what_if_content,
)

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 64rem; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem; }
.subtitle { color: #57606a; margin-top: 0; }
#peak-bytes { font-size: 2rem; font-weight: 700; margin: 1rem 0; padding: 0.6rem 1rem;
              background: #f6f8fa; border-left: 6px solid #c44e52; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { padding: 0.25rem 0.75rem; border-bottom: 1px solid #eaeef2; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em; }
.caption { color: #57606a; font-size: 0.9em; margin-top: 0.2rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
footer { margin-top: 3rem; color: #57606a; font-size: 0.85em; }
svg.chart { width: 100%; height: auto; border: 1px solid #d0d7de; background: #fff; font-size: 12px; }
svg.chart .total { fill: none; stroke: #4c72b0; stroke-width: 1.5; }
svg.chart .overlay { display: none; fill: none; stroke: #c44e52; stroke-width: 1.5; stroke-dasharray: 5 3; }
#overlay-toggle:checked ~ figure svg.chart .overlay { display: inline; }
svg.chart .sample > rect.hit { fill: transparent; }
svg.chart .sample:hover > rect.hit { fill: rgba(76, 114, 176, 0.15); }
svg.chart .tip { visibility: hidden; pointer-events: none; }
svg.chart .sample:hover .tip { visibility: visible; }
svg.chart .tip rect { fill: #fffbe6; stroke: #d0d7de; }
svg.chart .bar rect.value { fill: #4c72b0; }
svg.chart .bar.over rect.value { fill: #c44e52; }
svg.chart .bar:hover rect.value { opacity: 0.8; }
svg.chart .budget { stroke: #1f2328; stroke-dasharray: 4 3; }
.hazard { border-left: 6px solid #c44e52; background: #f6f8fa; padding: 0.4rem 0.8rem; margin: 0.5rem 0; }
"""

# No script, no fetch: the page needs nothing but its own styles and the embedded image.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(result: Any, plot_png: bytes | None, *, compare: Any = None) -> str:
    """Returns a self-contained HTML page for `result`, with `plot_png` embedded when given.

    The peak is in the element with id `peak-bytes`, e.g. `Peak: 123.45 MiB (129,446,912 bytes)`.
    `compare` (another result, e.g. the estimate of a measured run) is overlaid on the interactive
    timeline, shown by ticking the checkbox `overlay-toggle`; both runs' x axes span the chart.
    """
    workload = getattr(result, "workload", None)
    title = "memwise report" + (f": {workload}" if workload is not None else "")
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="subtitle">{escape(_subtitle(result))}</p>',
        f'<div id="peak-bytes">{escape(peak_text(result))}</div>',
    ]
    body.append(_html_table(summary_content(result), show_header=False))
    body.append("<h2>Timeline</h2>")
    if plot_png:
        encoded = base64.b64encode(plot_png).decode("ascii")
        body.append(
            f'<figure><img src="data:image/png;base64,{encoded}" '
            'alt="Live memory by category through the measured steps, with the peak marked"></figure>'
        )
    else:
        body.append('<p class="caption">No plot.</p>')
    body.append(timeline_svg(result, compare))
    body.append(hazards_html(result))
    body.append(_html_table(category_content(result)))
    body.append(_html_table(module_content(result)))
    what_if = what_if_content(result)
    if what_if is not None:
        body.append(_html_table(what_if))
        body.append(what_if_svg(result))
    assumptions = assumptions_of(result)
    if assumptions:
        items = "".join(f"<li>{escape(item)}</li>" for item in assumptions)
        body.append(f"<h2>Assumptions</h2>\n<ul>{items}</ul>")
    notes = notes_of(result)
    if notes:
        items = "".join(f"<li>{escape(item)}</li>" for item in notes)
        body.append(f"<h2>Notes</h2>\n<ul>{items}</ul>")
    body.append("<footer>Made by memwise. Sizes use binary units (1 MiB = 1,048,576 bytes).</footer>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(_CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _subtitle(result: Any) -> str:
    parts = []
    source, device = getattr(result, "source", None), getattr(result, "device", None)
    if source is not None or device is not None:
        parts.append(" on ".join(str(part) for part in (source, device) if part is not None))
    mode = getattr(result, "mode", None)
    if mode is not None:
        parts.append(str(getattr(mode, "value", mode)))
    batch_size = getattr(result, "batch_size", None)
    if batch_size is not None:
        parts.append(f"batch size {batch_size}")
    return " · ".join(parts)


def _html_table(content: TableContent, *, show_header: bool = True) -> str:
    def cell(tag: str, index: int, text: str) -> str:
        numeric = ' class="num"' if index in content.numeric_columns else ""
        is_code = tag == "td" and index in content.code_columns
        inner = f"<code>{escape(text)}</code>" if is_code else escape(text)
        return f"<{tag}{numeric}>{inner}</{tag}>"

    lines = [f"<h2>{escape(content.title)}</h2>", "<table>"]
    if show_header:
        lines.append("<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(content.headers)) + "</tr></thead>")
    lines.append("<tbody>")
    lines += ["<tr>" + "".join(cell("td", i, text) for i, text in enumerate(row)) + "</tr>" for row in content.rows]
    lines.append("</tbody>\n</table>")
    if content.caption:
        lines.append(f'<p class="caption">{escape(content.caption)}</p>')
    return "\n".join(lines)


_SVG_WIDTH, _SVG_HEIGHT, _MARGIN = 960, 280, 48
_MAX_HOVER_SAMPLES = 240


def _totals(result: Any) -> list[int]:
    timeline = result.timeline
    columns = [values for values in timeline.bytes_by_category.values() if values]
    return [sum(column[i] for column in columns) for i in range(len(timeline.x))]


def _kept_samples(count: int, peak_index: int) -> list[int]:
    """At most `_MAX_HOVER_SAMPLES` evenly spread sample indexes, the peak always among them."""
    stride = max(1, -(-count // _MAX_HOVER_SAMPLES))
    kept = list(range(0, count, stride))
    if 0 <= peak_index < count and peak_index not in kept:  # the peak takes its nearest neighbour's place
        nearest = min(range(len(kept)), key=lambda position: abs(kept[position] - peak_index))
        kept[nearest] = peak_index
    return sorted(kept)


def _points(xs: list[float], ys: list[int], top: int) -> list[tuple[float, float]]:
    span_x = (xs[-1] - xs[0]) or 1.0
    width, height = _SVG_WIDTH - 2 * _MARGIN, _SVG_HEIGHT - 2 * _MARGIN
    return [(_MARGIN + (x - xs[0]) / span_x * width, _SVG_HEIGHT - _MARGIN - y / top * height) for x, y in zip(xs, ys)]


def _tip_lines(result: Any, index: int, total: int) -> list[str]:
    timeline = result.timeline
    unit = "ms" if timeline.x_unit == "ms" else "event"
    lines = [f"{timeline.x[index]:.2f} {unit} · {timeline.phase[index]} · live {format_bytes(total)}"]
    notes = getattr(result, "timeline_allocations", None) or ()
    if index < len(notes):
        note = notes[index]
        what = f"{'+' if note.bytes >= 0 else '-'}{format_bytes(abs(note.bytes))}"
        lines.append(f"{what} by {note.op or 'no operator'} in {note.module or 'no module'}")
        lines.append(f"line: {note.file}:{note.line}" if note.file else "line: (none recorded)")
    else:
        biggest = sorted(((values[index], name) for name, values in timeline.bytes_by_category.items() if values), reverse=True)[:2]
        lines.append(", ".join(f"{name} {format_bytes(value)}" for value, name in biggest))
    return lines


def timeline_svg(result: Any, compare: Any = None) -> str:
    """The interactive timeline: total live bytes, a hover panel per sample, an optional overlay."""
    timeline = getattr(result, "timeline", None)
    if timeline is None or len(timeline.x) < 2:
        return ""
    totals = _totals(result)
    compare_totals = _totals(compare) if compare is not None and len(compare.timeline.x) >= 2 else None
    top = max(totals + (compare_totals or [])) or 1
    # x is the sample's position (event order), not its time: bursts of events then get hover
    # targets as wide as quiet stretches; the panel gives the time.
    xs = list(range(len(timeline.x)))
    points = _points(xs, totals, top)
    parts = [
        f'<svg class="chart" id="timeline-svg" viewBox="0 0 {_SVG_WIDTH} {_SVG_HEIGHT}" role="img" '
        'aria-label="Live memory through the steps; hover a point for details">',
        f'<text x="{_MARGIN}" y="20">live bytes in event order (peak {escape(format_bytes(top))}); hover for details</text>',
        '<polyline class="total" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>',
    ]
    if compare_totals is not None:
        compare_points = _points(list(range(len(compare.timeline.x))), compare_totals, top)
        parts.append('<polyline class="overlay" id="timeline-overlay" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in compare_points) + '"/>')
    kept = _kept_samples(len(xs), timeline.peak_index)
    for position, index in enumerate(kept):
        left = points[index][0] if position == 0 else (points[kept[position - 1]][0] + points[index][0]) / 2
        right = points[index][0] if position == len(kept) - 1 else (points[index][0] + points[kept[position + 1]][0]) / 2
        lines = _tip_lines(result, index, totals[index])
        tip_width = 12 + 7 * max(len(line) for line in lines)
        tip_x = min(max(points[index][0] + 8, _MARGIN), _SVG_WIDTH - tip_width - 2)
        texts = "".join(f'<text x="{tip_x + 6:.1f}" y="{34 + 16 * row}">{escape(line)}</text>' for row, line in enumerate(lines))
        parts.append(
            f'<g class="sample" id="sample-{index}"><title>{escape(" | ".join(lines))}</title>'
            f'<rect class="hit" x="{left:.1f}" y="{_MARGIN}" width="{max(right - left, 1):.1f}" height="{_SVG_HEIGHT - 2 * _MARGIN}"/>'
            f'<circle cx="{points[index][0]:.1f}" cy="{points[index][1]:.1f}" r="2" fill="#4c72b0"/>'
            f'<g class="tip"><rect x="{tip_x:.1f}" y="22" width="{tip_width}" height="{10 + 16 * len(lines)}"/>{texts}</g></g>'
        )
    parts.append("</svg>")
    toggle = ""
    if compare_totals is not None:
        label = f"overlay {getattr(compare, 'source', 'the other result')} on {getattr(result, 'source', 'this result')} (dashed red)"
        toggle = f'<input type="checkbox" id="overlay-toggle"><label for="overlay-toggle">{escape(label)}</label>\n'
    return f'<div class="interactive">\n{toggle}<figure>{"".join(parts)}</figure>\n</div>'


def what_if_svg(result: Any) -> str:
    """The result's what-if peaks as horizontal bars, with its budget as a dashed line (when set)."""
    what_if = getattr(result, "what_if", None) or ()
    rows = [("as is", result.peak_bytes)] + [(str(item.change), item.peak_bytes) for item in what_if if item.peak_bytes is not None]
    budget = getattr(result, "budget_bytes", None)
    top = max([peak for _, peak in rows] + ([budget] if budget else [])) or 1
    label_width, bar_height = 260, 22
    width = _SVG_WIDTH - label_width - _MARGIN
    height = 30 + bar_height * len(rows)
    parts = [f'<svg class="chart" id="what-if-svg" viewBox="0 0 {_SVG_WIDTH} {height}" role="img" aria-label="What-if peaks against the budget">']
    for row, (change, peak) in enumerate(rows):
        y = 20 + row * bar_height
        over = budget is not None and peak > budget
        text = f"{change}: {format_bytes(peak)}" + ("" if budget is None else (" (over budget)" if over else " (fits)"))
        parts.append(
            f'<g class="bar{" over" if over else ""}"><title>{escape(text)}</title>'
            f'<text x="4" y="{y + 15}">{escape(change[:36])}</text>'
            f'<rect class="value" x="{label_width}" y="{y + 3}" width="{max(peak / top * width, 1):.1f}" height="{bar_height - 6}"/>'
            f'<text x="{label_width + peak / top * width + 4:.1f}" y="{y + 15}">{escape(format_bytes(peak))}</text></g>'
        )
    if budget:
        x = label_width + budget / top * width
        parts.append(f'<line class="budget" x1="{x:.1f}" y1="12" x2="{x:.1f}" y2="{height - 4}"/>'
                     f'<text x="{x + 4:.1f}" y="12">budget {escape(format_bytes(budget))}</text>')
    parts.append("</svg>")
    return "<figure>" + "".join(parts) + "</figure>"


def hazards_html(result: Any) -> str:
    """The result's hazards (a `watch` result), each with its line, evidence and fix; empty when none."""
    hazards = getattr(result, "hazards", None)
    if hazards is None:
        return ""
    if not hazards:
        return "<h2>Hazards</h2>\n<p>No memory hazard found.</p>"
    items = []
    for hazard in hazards:
        steps = ", ".join(str(step) for step in hazard.steps)
        items.append(
            f'<div class="hazard"><strong><code>{escape(hazard.kind)}</code></strong> {escape(format_bytes(hazard.bytes))} at '
            f"<code>{escape(str(hazard.location))}</code> (steps {escape(steps)})<br>{escape(hazard.message)}<br>"
            f"<em>Fix:</em> {escape(hazard.fix)}</div>"
        )
    return "<h2>Hazards</h2>\n" + "\n".join(items)
