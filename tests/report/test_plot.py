import dataclasses

from memwise.measure.memory_log import CATEGORIES, Timeline
from memwise.report.plot import plot_timeline, timeline_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(profile_result, tmp_path):
    path = plot_timeline(profile_result, tmp_path / "timeline.png")

    data = path.read_bytes()
    assert path == tmp_path / "timeline.png"
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    assert len(data) > 1024
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.png"]  # no temporary file left


def test_plot_replaces_an_existing_file(profile_result, tmp_path):
    path = tmp_path / "timeline.png"
    path.write_bytes(b"old")

    plot_timeline(profile_result, path)

    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_of_an_empty_timeline_is_still_a_png(profile_result):
    empty = Timeline(x=(), x_unit="event", phase=(), bytes_by_category={c: () for c in CATEGORIES}, peak_index=0)

    data = timeline_png(dataclasses.replace(profile_result, timeline=empty))

    assert data[:8] == PNG_MAGIC


def test_plot_of_an_event_timeline(profile_result):
    timeline = profile_result.timeline
    by_event = dataclasses.replace(timeline, x=tuple(float(i) for i in range(len(timeline.x))), x_unit="event")

    data = timeline_png(dataclasses.replace(profile_result, timeline=by_event))

    assert data[:8] == PNG_MAGIC and len(data) > 1024
