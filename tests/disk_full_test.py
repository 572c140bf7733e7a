"""A full disk while writing a result file: one line naming the file and the
cause, the old file whole and no temporary left (ENOSPC injected into the
atomic writer).
"""

import errno
import os

import pytest

from recontrast_jax import reports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_result_file_on_a_full_disk_is_named_and_the_old_one_kept(
    tmp_path, monkeypatch
):
    path = tmp_path / "metrics.json"
    reports.atomic_write_json(path, {"old": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(reports.WriteError) as raised:
        reports.atomic_write_json(path, {"new": 2})
    assert str(raised.value) == f"cannot write {path}: no space left on device"
    assert path.read_text() == '{\n  "old": 1\n}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]
