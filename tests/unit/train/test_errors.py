"""The error helpers every entry shares: one message per launch, and output folders checked before any work."""

from __future__ import annotations

import os

import pytest

from slimforge.train import errors
from slimforge.train.errors import SlimforgeError, check_writable, report_error


def test_a_folder_that_does_not_exist_yet_is_writable_and_is_not_created(tmp_path):
    check_writable(tmp_path)
    check_writable(tmp_path / "a" / "b")
    assert sorted(os.listdir(tmp_path)) == []  # neither created nor left with a probe file


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_a_folder_that_cannot_be_created_is_refused_by_name(tmp_path, where):
    (tmp_path / "notes.txt").write_text("x")
    target = tmp_path / "notes.txt" if where == "is_a_file" else tmp_path / "notes.txt" / "run"
    with pytest.raises(SlimforgeError) as info:
        check_writable(target, "train.output_dir")
    assert info.value.problem == (
        f"train.output_dir {str(target)!r} cannot be created: {tmp_path / 'notes.txt'} is a file, not a folder"
    )
    assert "folder you can write to" in info.value.fix


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(SlimforgeError, match="cannot be created .* cannot be written to"):
        check_writable(tmp_path / "ro" / "run")


def test_only_rank_0_prints_at_once(capsys, monkeypatch):
    slept = []
    monkeypatch.setattr(errors, "RANK_GRACE_SECONDS", 0.01)
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setenv("RANK", "0")
    assert report_error(SlimforgeError("bad", "do this")) == 2
    assert capsys.readouterr().err == "error: bad\n  fix: do this\n" and slept == []
    # Another rank waits first: when rank 0 met the same error the launcher stops this rank before it prints.
    monkeypatch.setenv("RANK", "1")
    assert report_error(SlimforgeError("bad", "do this")) == 2
    assert slept == [0.01] and capsys.readouterr().err == "error: bad\n  fix: do this\n"
