import base64
import re

from memwise.core.units import format_bytes
from memwise.report.html import render_html
from memwise.report.plot import timeline_png


def test_html_embeds_the_plot_and_the_peak(profile_result):
    png = timeline_png(profile_result)

    page = render_html(profile_result, png)

    assert f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"' in page
    peak = f"Peak: {format_bytes(profile_result.peak_bytes)} ({profile_result.peak_bytes:,} bytes)"
    assert f'<div id="peak-bytes">{peak}</div>' in page
    assert "<code>optimizer_state</code>" in page
    assert "<code>(root)</code>" in page


def test_html_loads_nothing_from_outside(profile_result):
    page = render_html(profile_result, timeline_png(profile_result))

    assert "<script" not in page.lower()
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []
    assert "http://" not in page and "https://" not in page


def test_html_escapes_a_hostile_workload_name(hostile_profile):
    page = render_html(hostile_profile, None)

    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; [bold]mlp[/bold] | *a*" in page
    assert "No plot." in page


def test_html_shows_what_if_and_assumptions(hostile_estimate):
    page = render_html(hostile_estimate, None)

    assert "<h2>What if</h2>" in page
    assert "<td>checkpoint=full &lt;all&gt; | *b*</td>" in page
    for row in hostile_estimate.what_if[1:]:
        assert f"<td>{row.change}</td>" in page
    assert "<li>no &lt;other&gt; process uses the GPU</li>" in page
    assert "estimated on H100-80GB" in page
