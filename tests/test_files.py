"""`atomic_path`: the one way the pipeline writes files and folders."""

import pytest

from cosmocore.files import atomic_path, write_json


class Crash(Exception):
    pass


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"a": 1})
    with pytest.raises(Crash), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise Crash
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "deep" / "iter_0"
    for content in ("old", "new"):
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / content).write_text(content)
    assert [p.name for p in folder.iterdir()] == ["new"]
    assert [p.name for p in folder.parent.iterdir()] == ["iter_0"]


def test_first_writer_wins_without_overwrite(tmp_path):
    path = tmp_path / "cache"
    for content in ("first", "second"):
        with atomic_path(path, overwrite=False) as tmp:
            tmp.write_text(content)
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["cache"]
