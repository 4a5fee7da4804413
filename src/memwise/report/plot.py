"""The timeline plot: live bytes by category through the steps, with the peak marked.

Drawn with `matplotlib.figure.Figure` and the Agg canvas directly rather than pyplot, so plotting
neither picks nor changes the process-wide backend and keeps no figure alive afterwards.
"""

import io
import itertools
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from memwise.core.units import format_bytes
from memwise.measure.memory_log import CATEGORIES
from memwise.report.atomic import write_atomic

_MIB = 2**20
_CATEGORY_COLORS = {
    "param": "#4c72b0",
    "buffer": "#8172b3",
    "grad": "#dd8452",
    "optimizer_state": "#c44e52",
    "activation": "#55a868",
    "temporary": "#937860",
    "input": "#da8bc3",
}
_OTHER_COLORS = ("#8c8c8c", "#ccb974", "#64b5cd", "#2f4f4f")
_PHASE_COLORS = {"forward": "#e3ecf9", "backward": "#fbe5e1", "optimizer": "#e6f3e6"}
_X_LABELS = {"ms": "time (ms)", "event": "event"}


def timeline_png(result: Any) -> bytes:
    """The timeline of `result` as PNG bytes (see `plot_timeline`)."""
    figure = _timeline_figure(result)
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def plot_timeline(result: Any, path: str | os.PathLike[str]) -> Path:
    """Writes a stacked area chart of live bytes (MiB) by category against `result.timeline.x`.

    The peak is marked with a dashed vertical line and its size; forward, backward and optimizer
    phases are shaded. The PNG is written atomically (temporary file, then `os.replace`).

    Returns:
        The path of the PNG.
    """
    return write_atomic(path, timeline_png(result))


def _timeline_figure(result: Any) -> Figure:
    timeline = result.timeline
    figure = Figure(figsize=(10, 4.8), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.set_xlabel(_X_LABELS.get(timeline.x_unit, str(timeline.x_unit)))
    axes.set_ylabel("live memory (MiB)")
    title = "Live memory by category"
    workload = getattr(result, "workload", None)
    if workload is not None:
        title += f": {workload}"
    source = getattr(result, "source", None)
    if source is not None:
        title += f" ({source})"
    # A workload name is the user's text; no mathtext, so a "$" in it is shown as is.
    axes.set_title(title, loc="left", parse_math=False)
    x = list(timeline.x)
    if not x:
        axes.text(0.5, 0.5, "no timeline samples", transform=axes.transAxes, ha="center", va="center")
        return figure

    phase_handles = _shade_phases(axes, x, list(timeline.phase))
    category_handles = _stack_categories(axes, x, timeline.bytes_by_category)
    peak_index = min(max(timeline.peak_index, 0), len(x) - 1)
    peak_x = x[peak_index]
    peak_mib = sum(values[peak_index] for values in timeline.bytes_by_category.values() if values) / _MIB
    axes.axvline(peak_x, color="black", linestyle="--", linewidth=1)
    # Samples can share a timestamp, so the peak's step may have no width; the dot keeps it visible.
    axes.plot([peak_x], [peak_mib], marker="o", markersize=4, color="black")
    # Points to the right of the peak, or to the left when the peak is in the right half.
    on_right = peak_x <= (x[0] + x[-1]) / 2
    axes.annotate(
        f"peak {format_bytes(result.peak_bytes)}",
        xy=(peak_x, peak_mib),
        xytext=(12 if on_right else -12, -4),
        textcoords="offset points",
        ha="left" if on_right else "right",
        va="top",
        fontsize=10,
        fontweight="bold",
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "black", "alpha": 0.9},
        parse_math=False,
    )
    axes.set_xlim(x[0], x[-1] if x[-1] > x[0] else x[0] + 1)
    axes.set_ylim(0, max(peak_mib, result.peak_bytes / _MIB) * 1.12 or 1)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(
        handles=category_handles + phase_handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=9,
        frameon=False,
    )
    return figure


def _stack_categories(axes: Any, x: list[float], bytes_by_category: dict[str, tuple[int, ...]]) -> list[Patch]:
    """Draws each non-empty category on top of the ones before it, as a step function."""
    names = [name for name in CATEGORIES if name in bytes_by_category]
    names += sorted(name for name in bytes_by_category if name not in CATEGORIES)
    bottom = [0.0] * len(x)
    handles = []
    extra_colors = itertools.cycle(_OTHER_COLORS)
    for name in names:
        values = bytes_by_category[name]
        color = _CATEGORY_COLORS.get(name) or next(extra_colors)
        if not any(values):
            continue
        top = [below + value / _MIB for below, value in zip(bottom, values)]
        # Live bytes hold from one event to the next, hence a post-step rather than a slope.
        axes.fill_between(x, bottom, top, step="post", color=color, linewidth=0)
        handles.append(Patch(color=color, label=name))
        bottom = top
    axes.step(x, bottom, where="post", color="black", linewidth=0.6)
    return handles


def _shade_phases(axes: Any, x: list[float], phases: list[str]) -> list[Patch]:
    """Shades each run of samples in the same phase; idle is left white."""
    seen: list[str] = []
    start = 0
    for index in range(1, len(phases) + 1):
        if index < len(phases) and phases[index] == phases[start]:
            continue
        phase = phases[start]
        color = _PHASE_COLORS.get(phase)
        if color is not None:
            end = x[index] if index < len(x) else x[-1]
            axes.axvspan(x[start], end, color=color, linewidth=0, zorder=0)
            if phase not in seen:
                seen.append(phase)
        start = index
    return [Patch(color=_PHASE_COLORS[phase], label=f"{phase} phase") for phase in seen]
