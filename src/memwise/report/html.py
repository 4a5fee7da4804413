"""The HTML report: one self-contained page (inline CSS, the plot as a data URI, no scripts).

Every piece of text from the result is HTML-escaped, and the page's Content-Security-Policy
allows no script and no external resource, so a hostile workload or module name is shown as text.
"""

import base64
from html import escape
from typing import Any

from memwise.report.tables import (
    TableContent,
    assumptions_of,
    category_content,
    module_content,
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
"""

# No script, no fetch: the page needs nothing but its own styles and the embedded image.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(result: Any, plot_png: bytes | None) -> str:
    """Returns a self-contained HTML page for `result`, with `plot_png` embedded when given.

    The peak is in the element with id `peak-bytes`, e.g. `Peak: 123.45 MiB (129,446,912 bytes)`.
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
    body.append(_html_table(category_content(result)))
    body.append(_html_table(module_content(result)))
    what_if = what_if_content(result)
    if what_if is not None:
        body.append(_html_table(what_if))
    assumptions = assumptions_of(result)
    if assumptions:
        items = "".join(f"<li>{escape(item)}</li>" for item in assumptions)
        body.append(f"<h2>Assumptions</h2>\n<ul>{items}</ul>")
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
