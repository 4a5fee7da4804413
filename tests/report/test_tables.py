import io
import re

import pytest
from rich.console import Console

from memwise.core.errors import BadInputError
from memwise.core.units import format_bytes
from memwise.measure.memory_log import CATEGORIES
from memwise.report.tables import (
    category_table,
    module_content,
    module_table,
    render_markdown,
    render_terminal,
    summary_table,
)


def _terminal_text(result, width: int = 200) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    render_terminal(result, console)
    return console.file.getvalue()


def test_markdown_holds_the_peak_and_every_category(profile_result):
    markdown = render_markdown(profile_result)

    assert f"Peak: {format_bytes(profile_result.peak_bytes)} ({profile_result.peak_bytes:,} bytes)" in markdown
    for category in CATEGORIES:
        assert f"| `{category}` | {format_bytes(profile_result.by_category[category])} |" in markdown
    assert "| Phase at peak | " + profile_result.phase_at_peak in markdown


def test_markdown_shares_are_of_the_peak(profile_result):
    markdown = render_markdown(profile_result)
    param_share = 100 * profile_result.by_category["param"] / profile_result.peak_bytes

    assert f"| `param` | {format_bytes(profile_result.by_category['param'])} | {param_share:.1f}% |" in markdown


def test_markdown_escapes_a_hostile_workload_name(hostile_profile):
    markdown = render_markdown(hostile_profile)

    assert "<script>" not in markdown
    assert r"\<script\>" in markdown
    # An unescaped "|" would split the table row into an extra cell.
    workload_row = next(line for line in markdown.splitlines() if line.startswith("| Workload |"))
    cells = re.split(r"(?<!\\)\|", workload_row)[1:-1]
    assert len(cells) == 2


def test_terminal_shows_every_table(profile_result):
    text = _terminal_text(profile_result)

    assert format_bytes(profile_result.peak_bytes) in text
    for title in ("Summary", "Memory by category at the peak", "Modules at the peak"):
        assert title in text
    for category in CATEGORIES:
        assert category in text
    assert "(root)" in text


def test_terminal_shows_rich_markup_in_names_as_text(hostile_profile):
    text = _terminal_text(hostile_profile)

    assert "[bold]mlp[/bold]" in text


def test_tables_have_one_row_per_category_and_module(profile_result):
    assert summary_table(profile_result).row_count >= 5
    assert category_table(profile_result).row_count == len(CATEGORIES)
    assert module_table(profile_result).row_count == len(profile_result.by_module)


def test_module_table_keeps_the_largest_modules(profile_result):
    totals = sorted(
        (m.param_bytes + m.grad_bytes + m.activation_bytes for m in profile_result.by_module), reverse=True
    )

    content = module_content(profile_result, limit=1)

    assert len(content.rows) == 1
    assert content.rows[0][4] == format_bytes(totals[0])
    assert content.caption.startswith(f"Top 1 of {len(profile_result.by_module)} modules")


def test_module_table_rejects_a_bad_limit(profile_result):
    with pytest.raises(BadInputError, match="limit: must be a positive integer, got 0"):
        module_table(profile_result, limit=0)


def test_optional_estimate_fields_are_shown(estimate_result):
    estimate = estimate_result
    markdown = render_markdown(estimate)
    terminal = _terminal_text(estimate)

    for text in (markdown, terminal):
        assert f"{format_bytes(estimate.low_bytes)} – {format_bytes(estimate.high_bytes)}" in text
        assert f"{format_bytes(estimate.budget_bytes)}: fits" in text
        assert format_bytes(estimate.reserved_bytes) in text and format_bytes(estimate.context_bytes) in text
        assert "estimated" in text and "H100-80GB" in text
        assert estimate.assumptions[-1] in text  # how the model was built (plain words: no Markdown escapes)
    what_if_rows = [line for line in markdown.split("## What if")[1].splitlines() if line.startswith("| ")][2:]  # header, rule
    assert len(what_if_rows) == len(estimate.what_if)
    for row, line in zip(estimate.what_if, what_if_rows):
        assert row.change in terminal
        delta = row.peak_bytes - estimate.peak_bytes
        assert f" | {format_bytes(row.peak_bytes)} | " in line and f"({100 * delta / estimate.peak_bytes:+.1f}%)" in line
        assert line.endswith(f"| {'yes' if row.fits else 'no'} | {row.method} |")


def test_markup_in_an_estimate_is_escaped(hostile_estimate):
    markdown = render_markdown(hostile_estimate)
    terminal = _terminal_text(hostile_estimate)

    assert r"no \<other\> process uses the GPU" in markdown
    assert r"checkpoint=full \<all\> \| \*b\*" in markdown
    assert "checkpoint=full <all> | *b*" in terminal


def test_reference_peak_is_shown_with_its_ratio(verified_profile):
    ratio = verified_profile.peak_bytes / verified_profile.reference_peak_bytes
    for text in (render_markdown(verified_profile), _terminal_text(verified_profile)):
        assert f"peak / reference = {ratio:.3f}" in text


def test_absent_optional_fields_are_not_shown(profile_result):
    markdown = render_markdown(profile_result)

    assert profile_result.reference_peak_bytes is None
    for label in ("Reference peak", "Budget", "What if", "Assumptions", "Peak range"):
        assert label not in markdown
