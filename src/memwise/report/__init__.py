"""Rendering of results (rich tables, Markdown, the timeline plot, the HTML page, report files).

Reads results and computes nothing: every number shown is a field of the result, or a share or
ratio of two of them.
"""

from memwise.report.html import render_html
from memwise.report.output import write_report
from memwise.report.plot import plot_timeline, timeline_png
from memwise.report.tables import (
    category_table,
    module_table,
    render_markdown,
    render_terminal,
    summary_table,
)

__all__ = [
    "category_table", "module_table", "plot_timeline", "render_html", "render_markdown", "render_terminal",
    "summary_table", "timeline_png", "write_report",
]
