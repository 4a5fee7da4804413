"""The plan's frontier: predicted peak memory against predicted step time, the chosen recipe marked.

Drawn with `matplotlib.figure.Figure` and the Agg canvas, like the timeline plot, so no pyplot
state is touched.
"""

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MIB = 2**20


def frontier_png(plan: Any) -> bytes:
    """PNG bytes of `plan.alternatives` (peak MiB vs step ms), the budget as a line, the chosen point ringed."""
    figure = Figure(figsize=(7, 4.5), dpi=110)
    axes = figure.add_subplot()
    points = list(plan.alternatives)
    fitting = [alt for alt in points if alt.fits]
    over = [alt for alt in points if not alt.fits]
    for group, color, label in ((fitting, "#55a868", "fits"), (over, "#c44e52", "over budget")):
        if group:
            axes.scatter([alt.predicted_step_ms for alt in group], [alt.predicted_peak_bytes / _MIB for alt in group],
                         color=color, label=label, zorder=3)
    axes.plot([alt.predicted_step_ms for alt in points], [alt.predicted_peak_bytes / _MIB for alt in points],
              color="#8c8c8c", linewidth=1, zorder=2)
    for alt in points:
        if alt.chosen:
            axes.scatter([alt.predicted_step_ms], [alt.predicted_peak_bytes / _MIB], s=220, facecolors="none",
                         edgecolors="#4c72b0", linewidths=2, label="chosen", zorder=4)
            axes.annotate(alt.description, (alt.predicted_step_ms, alt.predicted_peak_bytes / _MIB),
                          textcoords="offset points", xytext=(8, 8), fontsize=8)
    axes.axhline(plan.budget_bytes / _MIB, color="#4c72b0", linestyle="--", linewidth=1, label="budget")
    axes.set_xlabel("predicted step time (ms)")
    axes.set_ylabel("predicted peak (MiB)")
    axes.set_title(f"{plan.workload} on {plan.device}: memory/time frontier (effective batch {plan.effective_batch_size})")
    axes.legend(loc="upper right", fontsize=8)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
