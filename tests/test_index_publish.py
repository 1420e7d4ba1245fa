"""mris.index.publish: version names, atomic flip, list, gc, stale build folders."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from mris.errors import MrisError
from mris.index import publish as pub


def fake_version(root, name):
    (root / name).mkdir()
    (root / name / "card.json").write_text("{}")
    return name


def test_version_names_sort_by_time():
    t0 = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    names = [pub.new_version_name(t0 + timedelta(microseconds=i * 7919)) for i in range(20)]
    assert names == sorted(names) and all(pub.is_version_name(n) for n in names)


def test_publish_list_gc_never_removes_current(tmp_path):
    names = [
        fake_version(tmp_path, pub.new_version_name(datetime(2025, 1, d, tzinfo=timezone.utc)))
        for d in (1, 2, 3, 4)
    ]
    assert pub.current_version(tmp_path) is None
    pub.publish(tmp_path, names[0])
    assert pub.current_version(tmp_path) == names[0]
    assert os.readlink(tmp_path / "current") == names[0]  # relative: the root can move
    assert [v.version for v in pub.list_versions(tmp_path)] == names
    assert [v.current for v in pub.list_versions(tmp_path)] == [True, False, False, False]
    removed = pub.gc(tmp_path, keep=1)
    assert removed == names[1:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[3], "current"])
    pub.publish(tmp_path, names[3])
    assert pub.gc(tmp_path, keep=1) == [names[0]]
    with pytest.raises(MrisError):
        pub.gc(tmp_path, keep=0)
    with pytest.raises(MrisError, match="not a finished"):
        pub.publish(tmp_path, "20250101T000000000000Z-abcdef")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_building_dirs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".building-20250101T000000000000Z-abcdef-{dead_pid}"
    stale.mkdir()
    (stale / "card.json").write_text("{}")
    live = tmp_path / f".building-20250101T000000000000Z-abcdee-{os.getppid()}"
    live.mkdir()
    removed = pub.remove_stale_builds(tmp_path)
    assert removed == [stale] and live.exists()
    assert pub.list_versions(tmp_path) == []  # a building folder never looks like a version
