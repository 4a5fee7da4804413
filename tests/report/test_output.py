import json

import pytest

from memwise import Profile
from memwise.core.errors import BadInputError
from memwise.report.output import MANIFEST_NAME, write_report


def test_write_report_writes_three_files_and_the_manifest(profile_result, tmp_path):
    out_dir = tmp_path / "new" / "report"

    paths = write_report(profile_result, out_dir)

    assert paths == {"json": out_dir / "profile.json", "png": out_dir / "timeline.png", "html": out_dir / "report.html"}
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == sorted([MANIFEST_NAME, "profile.json", "report.html", "timeline.png"])
    assert Profile.from_dict(json.loads(paths["json"].read_text())) == profile_result
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'id="peak-bytes"' in paths["html"].read_text()
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    assert manifest == {"version": 1, "files": ["profile.json", "report.html", "timeline.png"]}


def test_write_report_does_not_overwrite_a_user_file(profile_result, tmp_path):
    user_file = tmp_path / "report.html"
    user_file.write_text("my own notes")

    with pytest.raises(BadInputError, match=r"report\.html.*choose another --out directory or remove"):
        write_report(profile_result, tmp_path)

    assert user_file.read_text() == "my own notes"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # nothing else written either


def test_write_report_again_replaces_its_own_files(profile_result, hostile_profile, tmp_path):
    write_report(profile_result, tmp_path)

    paths = write_report(hostile_profile, tmp_path)

    assert json.loads(paths["json"].read_text())["workload"] == hostile_profile.workload
    assert len(list(tmp_path.iterdir())) == 4


def test_write_report_keeps_other_files_and_earlier_stems(profile_result, tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    write_report(profile_result, tmp_path)

    write_report(profile_result, tmp_path, stem="run-2")

    assert (tmp_path / "notes.txt").read_text() == "keep"
    assert (tmp_path / "run-2.json").exists() and (tmp_path / "profile.json").exists()
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["files"] == ["profile.json", "report.html", "run-2.json", "timeline.png"]


def test_write_report_writes_nothing_when_rendering_fails(profile_result, tmp_path):
    class Unserializable:
        def __getattr__(self, name):
            return getattr(profile_result, name)

        def to_dict(self):
            return {"peak_bytes": object()}

    with pytest.raises(TypeError):
        write_report(Unserializable(), tmp_path / "out")

    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stem", ["", "a/b", ".hidden", ".memwise-manifest"])
def test_write_report_rejects_a_stem_that_is_not_a_plain_name(profile_result, tmp_path, stem):
    with pytest.raises(BadInputError, match="stem: must be a plain file name"):
        write_report(profile_result, tmp_path, stem=stem)


def test_write_report_rejects_a_file_as_out_dir(profile_result, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")

    with pytest.raises(BadInputError, match="out_dir: .* is not a directory"):
        write_report(profile_result, not_a_dir)


def test_write_report_rejects_an_unreadable_manifest(profile_result, tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")

    with pytest.raises(BadInputError, match=r"cannot read memwise's manifest"):
        write_report(profile_result, tmp_path)
