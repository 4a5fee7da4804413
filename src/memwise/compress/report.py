"""The HTML page of a compression result: headline figures and every trial, flags included."""

import html

from memwise.compress.result import CompressionResult
from memwise.core.units import format_bytes


def render_html(result: CompressionResult) -> str:
    """A self-contained HTML page for `result`."""
    original, compressed = result.original, result.compressed
    rows = []
    for trial in result.trials:
        ratio = trial.latency_ms["batch_32"] / trial.original_latency_ms["batch_32"]
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
                trial.method, format_bytes(trial.size_bytes), f"{trial.size_bytes / original.size_bytes:.3f}x",
                f"{trial.metric:.4f}", f"{trial.metric_drop:+.4f}", f"{trial.latency_ms['batch_1']:.2f}",
                f"{trial.latency_ms['batch_32']:.1f}", f"{ratio:.2f}x", "yes" if trial.accepted else "no",
                ", ".join(trial.flags),
            )) + "</tr>"
        )
    skipped = "".join(f"<li>{html.escape(item.method)}: {html.escape(item.reason)}</li>" for item in result.skipped)
    methods = "".join(f"<li>{html.escape(item.name)} {html.escape(str(item.params))}</li>" for item in result.methods)
    verdict = "meets the guard" if result.feasible else "NO candidate meets the guard (best found shown, not saved)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>memwise compress: {html.escape(result.workload)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>memwise compress: {html.escape(result.workload)}</h1>
<p>Objective {html.escape(result.objective.value)}, max metric drop {result.max_metric_drop}: {verdict}.</p>
<table><tr><th></th><th>size</th><th>metric</th><th>latency batch 1 (ms)</th><th>latency batch 32 (ms)</th></tr>
<tr><td>original</td><td>{format_bytes(original.size_bytes)}</td><td>{original.metric:.4f}</td><td>{original.latency_ms['batch_1']:.2f}</td><td>{original.latency_ms['batch_32']:.1f}</td></tr>
<tr><td>compressed</td><td>{format_bytes(compressed.size_bytes)} ({result.size_ratio:.3f}x)</td><td>{compressed.metric:.4f} ({-result.metric_drop:+.4f})</td><td>{compressed.latency_ms['batch_1']:.2f}</td><td>{compressed.latency_ms['batch_32']:.1f} ({result.latency_ratio:.2f}x)</td></tr>
</table>
<h2>Methods applied</h2><ul>{methods}</ul>
<h2>Trials</h2>
<p>Sizes are of the saved file; latencies are CPU medians measured side by side with the original ({html.escape(result.measured_on)}).</p>
<table><tr><th>method</th><th>size</th><th>size ratio</th><th>metric</th><th>drop</th><th>batch 1 ms</th><th>batch 32 ms</th><th>latency ratio</th><th>accepted</th><th>flags</th></tr>
{''.join(rows)}</table>
<h2>Skipped</h2><ul>{skipped or '<li>none</li>'}</ul>
<p>Model: {html.escape(str(result.path))} (reload with <code>memwise.load_compressed(path)</code>; metric after reload: {result.reloaded_metric})</p>
</body></html>
"""
