"""Tables of a result (a `Profile` today, an `Estimate` too): for the terminal (rich) and Markdown.

The renderers read only the fields every result has (`peak_bytes`, `baseline_bytes`,
`by_category`, `by_module`, `phase_at_peak`, `timeline`) and show the optional ones
(`reference_peak_bytes`, `low_bytes`, `high_bytes`, `budget_bytes`, `fits`, `what_if`,
`assumptions`, ...) when the result has them and they are not None. Nothing here computes memory:
the only arithmetic is shares and ratios of numbers the result already holds.

The content of each table is built once as a `TableContent` of display strings, which the rich,
Markdown and HTML renderers (`memwise.report.html`) lay out, so the three always agree.
"""

import dataclasses
import enum
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from memwise.core.errors import BadInputError
from memwise.core.units import format_bytes
from memwise.measure.memory_log import CATEGORIES


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableContent:
    """One table as display strings.

    Attributes:
        title: the table's heading.
        headers: one per column.
        rows: cells, one string per column.
        numeric_columns: indexes of columns holding numbers (right-aligned).
        code_columns: indexes of columns holding identifiers (module and category names), shown
            as code so Markdown leaves their underscores and dots alone.
        caption: a note shown under the table, or None.
    """

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric_columns: tuple[int, ...] = ()
    code_columns: tuple[int, ...] = ()
    caption: str | None = None


def peak_text(result: Any) -> str:
    """The headline figure, e.g. `Peak: 123.45 MiB (129,446,912 bytes)`."""
    return f"Peak: {format_bytes(result.peak_bytes)} ({result.peak_bytes:,} bytes)"


def summary_content(result: Any) -> TableContent:
    """What the result is (source, device, workload, recipe) and its headline numbers."""
    rows: list[tuple[str, str]] = [("Peak", f"{format_bytes(result.peak_bytes)} ({result.peak_bytes:,} bytes)")]
    low, high = _optional(result, "low_bytes"), _optional(result, "high_bytes")
    if low is not None and high is not None:
        rows.append(("Peak range", f"{format_bytes(low)} – {format_bytes(high)}"))
    rows.append(("Baseline (before the first step)", format_bytes(result.baseline_bytes)))
    reference = _optional(result, "reference_peak_bytes")
    if reference is not None:
        ratio = f"; peak / reference = {result.peak_bytes / reference:.3f}" if reference > 0 else ""
        rows.append(("Reference peak (plain torch.profiler)", f"{format_bytes(reference)}{ratio}"))
    for name, label in (
        ("cuda_max_allocated_bytes", "CUDA max allocated"),
        ("reserved_bytes", "Reserved by the allocator"),
        ("context_bytes", "CUDA context"),
    ):
        value = _optional(result, name)
        if value is not None:
            rows.append((label, format_bytes(value)))
    budget, fits = _optional(result, "budget_bytes"), _optional(result, "fits")
    if budget is not None:
        verdict = "" if fits is None else (": fits" if fits else ": does not fit")
        rows.append(("Budget", f"{format_bytes(budget)}{verdict}"))
    elif fits is not None:
        rows.append(("Fits", "yes" if fits else "no"))
    phase = str(result.phase_at_peak)
    step_at_peak = _optional(result, "step_at_peak")
    rows.append(("Phase at peak", phase if step_at_peak is None else f"{phase} (step {step_at_peak})"))
    step_ms = _optional(result, "step_ms")
    if step_ms is not None:
        rows.append(("Step time", f"{step_ms:.1f} ms"))
    elapsed_s = _optional(result, "elapsed_s")
    if elapsed_s is not None:
        rows.append(("Elapsed", f"{elapsed_s:.2f} s"))
    for name, label in (
        ("source", "Source"),
        ("device", "Device"),
        ("workload", "Workload"),
        ("mode", "Mode"),
        ("batch_size", "Batch size"),
        ("steps", "Steps"),
    ):
        value = _optional(result, name)
        if value is not None:
            rows.append((label, _plain(value)))
    recipe = _optional(result, "recipe")
    if recipe is not None:
        rows.append(("Recipe", _recipe_text(recipe)))
    torch_version = _optional(result, "torch_version")
    if torch_version is not None:
        rows.append(("torch", str(torch_version)))
    return TableContent(title="Summary", headers=("Quantity", "Value"), rows=tuple(rows))


def category_content(result: Any) -> TableContent:
    """Bytes of each category at the peak and its share of the peak, in `CATEGORIES` order."""
    by_category = dict(result.by_category)
    names = [name for name in CATEGORIES if name in by_category]
    names += sorted(name for name in by_category if name not in CATEGORIES)
    rows = tuple(
        (name, format_bytes(by_category[name]), _share_text(by_category[name], result.peak_bytes)) for name in names
    )
    total = sum(by_category.values())
    return TableContent(
        title="Memory by category at the peak",
        headers=("Category", "Bytes", "Share of peak"),
        rows=rows,
        numeric_columns=(1, 2),
        code_columns=(0,),
        caption=f"Sum of categories: {format_bytes(total)} ({_share_text(total, result.peak_bytes)} of the peak).",
    )


def module_content(result: Any, limit: int = 15) -> TableContent:
    """The `limit` modules holding the most parameter + gradient + activation bytes at the peak.

    A module's bytes include its submodules', so `(root)` holds the whole model's.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadInputError(f"limit: must be a positive integer, got {limit!r}")
    modules = sorted(result.by_module, key=lambda m: (-_module_total(m), m.module))
    shown = modules[:limit]
    rows = tuple(
        (
            m.module,
            format_bytes(m.param_bytes),
            format_bytes(m.grad_bytes),
            format_bytes(m.activation_bytes),
            format_bytes(_module_total(m)),
        )
        for m in shown
    )
    caption = None
    if len(modules) > len(shown):
        caption = f"Top {len(shown)} of {len(modules)} modules by parameter + gradient + activation bytes."
    elif not modules:
        caption = "No module holds parameter, gradient or activation bytes at the peak."
    return TableContent(
        title="Modules at the peak (submodules included)",
        headers=("Module", "Params", "Grads", "Activations", "Total"),
        rows=rows,
        numeric_columns=(1, 2, 3, 4),
        code_columns=(0,),
        caption=caption,
    )


def what_if_content(result: Any) -> TableContent | None:
    """The peak under each alternative change the result lists in `what_if`, or None without any."""
    what_if = _optional(result, "what_if")
    if not what_if:
        return None
    rows = []
    for item in what_if:
        change, peak = _item_field(item, "change"), _item_field(item, "peak_bytes")
        fits = _item_field(item, "fits")
        fits_text = "n/a" if fits is None else ("yes" if fits else "no")
        method = str(_item_field(item, "method") or "")
        if peak is None:
            rows.append((str(change), "n/a", "n/a", fits_text, method))
            continue
        delta = peak - result.peak_bytes
        sign = "+" if delta > 0 else ""
        share = _share_text(delta, result.peak_bytes, signed=True)
        rows.append((str(change), format_bytes(peak), f"{sign}{format_bytes(delta)} ({share})", fits_text, method))
    return TableContent(
        title="What if",
        headers=("Change", "Peak", "Change in peak", "Fits", "How"),
        rows=tuple(rows),
        numeric_columns=(1, 2),
    )


def assumptions_of(result: Any) -> list[str]:
    """The result's `assumptions` as strings (empty when it has none)."""
    return [str(item) for item in (_optional(result, "assumptions") or [])]


def notes_of(result: Any) -> list[str]:
    """What the recipe's strategies said about the run (`notes`; empty when there are none)."""
    return [str(item) for item in (_optional(result, "notes") or [])]


def summary_table(result: Any) -> Table:
    """The summary as a rich table."""
    return _rich_table(summary_content(result), show_header=False)


def category_table(result: Any) -> Table:
    """Bytes by category at the peak, and their share of the peak, as a rich table."""
    return _rich_table(category_content(result))


def module_table(result: Any, limit: int = 15) -> Table:
    """The top `limit` modules by parameter + gradient + activation bytes at the peak, as a rich table."""
    return _rich_table(module_content(result, limit))


def render_terminal(result: Any, console: Console) -> None:
    """Prints the summary, category, module and (when present) what-if tables and assumptions."""
    console.print(summary_table(result))
    console.print(category_table(result))
    console.print(module_table(result))
    what_if = what_if_content(result)
    if what_if is not None:
        console.print(_rich_table(what_if))
    assumptions = assumptions_of(result)
    if assumptions:
        console.print(Text("Assumptions", style="bold"))
        for assumption in assumptions:
            console.print(Text(f"  - {assumption}"))
    notes = notes_of(result)
    if notes:
        console.print(Text("Notes", style="bold"))
        for note in notes:
            console.print(Text(f"  - {note}"))


def render_markdown(result: Any) -> str:
    """The same content as `render_terminal`, as Markdown (GitHub-flavoured tables)."""
    workload = _optional(result, "workload")
    title = "# memwise report" + (f": {_md_text(str(workload))}" if workload is not None else "")
    parts = [title, f"**{_md_text(peak_text(result))}**"]
    contents = [summary_content(result), category_content(result), module_content(result)]
    what_if = what_if_content(result)
    if what_if is not None:
        contents.append(what_if)
    parts += [_markdown_table(content) for content in contents]
    assumptions = assumptions_of(result)
    if assumptions:
        parts.append("## Assumptions\n\n" + "\n".join(f"- {_md_text(item)}" for item in assumptions))
    notes = notes_of(result)
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {_md_text(item)}" for item in notes))
    return "\n\n".join(parts) + "\n"


def _rich_table(content: TableContent, *, show_header: bool = True) -> Table:
    table = Table(title=content.title, show_header=show_header, caption=content.caption, title_justify="left")
    for index, header in enumerate(content.headers):
        table.add_column(
            header,
            justify="right" if index in content.numeric_columns else "left",
            style="cyan" if index in content.code_columns else None,
            no_wrap=index in content.numeric_columns,
        )
    for row in content.rows:
        # Text cells, not str: a str would be read as rich markup, so a module or workload name
        # such as "[red]x" would change the output instead of being shown.
        table.add_row(*(Text(cell) for cell in row))
    return table


def _markdown_table(content: TableContent) -> str:
    def cell(index: int, text: str) -> str:
        return _md_code(text) if index in content.code_columns else _md_text(text)

    align = tuple("---:" if index in content.numeric_columns else "---" for index in range(len(content.headers)))
    lines = [
        f"## {_md_text(content.title)}",
        "",
        "| " + " | ".join(_md_text(header) for header in content.headers) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(cell(index, text) for index, text in enumerate(row)) + " |" for row in content.rows]
    if content.caption:
        lines += ["", f"_{_md_text(content.caption)}_"]
    return "\n".join(lines)


_MARKDOWN_SPECIAL = set("\\`*_[]<>|#&~")


def _md_text(text: str) -> str:
    """Escapes text so Markdown shows it as is (no emphasis, links, HTML or table breaks)."""
    flat = " ".join(text.splitlines())
    return "".join("\\" + char if char in _MARKDOWN_SPECIAL else char for char in flat)


def _md_code(text: str) -> str:
    """A code span holding `text`; `|` is escaped because GFM splits table cells before code spans."""
    flat = " ".join(text.splitlines()).replace("|", "\\|")
    longest_run, run = 0, 0
    for char in flat:
        run = run + 1 if char == "`" else 0
        longest_run = max(longest_run, run)
    fence = "`" * (longest_run + 1)
    padding = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{padding}{flat}{padding}{fence}"


def _optional(result: Any, name: str) -> Any:
    return getattr(result, name, None)


def _item_field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _module_total(module: Any) -> int:
    return module.param_bytes + module.grad_bytes + module.activation_bytes


def _share_text(part: int, whole: int, *, signed: bool = False) -> str:
    if whole <= 0:
        return "n/a"
    share = 100.0 * part / whole
    return f"{share:+.1f}%" if signed else f"{share:.1f}%"


def _plain(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _recipe_text(recipe: Any) -> str:
    """`precision=bf16, checkpoint=full`: the fields that differ from their defaults (the batch
    size has its own row); `defaults` when none does."""
    if not dataclasses.is_dataclass(recipe):
        return str(recipe)
    parts = []
    for field in dataclasses.fields(recipe):
        value = getattr(recipe, field.name)
        if field.name == "batch_size" or value == field.default:
            continue
        parts.append(f"{field.name}={_plain(value)}")
    return ", ".join(parts) or "defaults"
