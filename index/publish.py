"""Versions under an index root, and the atomic flip of ``current``.

Layout::

    INDEX_ROOT/
      current -> 20251124T195012123456Z-3fa2c1     (relative symlink)
      20251124T195012123456Z-3fa2c1/               (immutable bundles, one per version)
      .building-<version>-<pid>/                   (a build in progress; never looks whole)

A build writes into ``.building-<version>-<pid>``, verifies, and renames it to ``<version>``
(one ``rename``: a half bundle never has a version name). Publishing creates a symlink under a
temporary name and ``os.replace``s it onto ``current`` (one ``rename``: readers see the old or
the new target, never nothing). Version names sort by build time (UTC, microseconds) with a
short hash after it, so ``sorted()`` is chronological.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mris.errors import MrisError
from mris.fsutil import fsync_dir

CURRENT = "current"
BUILDING_PREFIX = ".building-"
DELETING_PREFIX = ".deleting-"
CARD_NAME = "card.json"
_VERSION_RE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{6}$")


def new_version_name(now: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSSffffffZ-xxxxxx``: sortable by time, unique by the random suffix."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def is_version_name(name: str) -> bool:
    return bool(_VERSION_RE.match(name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(root: Path) -> list[Path]:
    """Remove ``.building-*`` / ``.deleting-*`` folders whose process is gone (a killed build).

    A folder of a build still running (its pid alive) is left alone.
    """
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name.startswith(BUILDING_PREFIX):
            pid_text = entry.name.rsplit("-", 1)[-1]
            if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
                continue
        elif not entry.name.startswith(DELETING_PREFIX):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def building_dir(root: Path, version: str) -> Path:
    return root / f"{BUILDING_PREFIX}{version}-{os.getpid()}"


def finalize(building: Path, root: Path, version: str) -> Path:
    """Rename a finished, verified build folder to its version name (atomic)."""
    target = root / version
    if target.exists():
        raise MrisError(f"index version {target} already exists")
    os.rename(building, target)
    fsync_dir(root)
    return target


def current_version(root: str | Path) -> str | None:
    """The version ``current`` points at, or None when nothing is published."""
    link = Path(root) / CURRENT
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def resolve(path: str | Path) -> Path:
    """An index root (-> its current version), a ``current`` link, or a version folder -> the
    version folder."""
    path = Path(path)
    if (path / CARD_NAME).is_file():
        return path.resolve()
    if (path / CURRENT).exists():
        return (path / CURRENT).resolve()
    raise MrisError(
        f"{path} is neither an index bundle nor an index root with a published 'current'"
    )


def publish(root: str | Path, version: str) -> None:
    """Point ``root/current`` at ``version`` atomically (symlink under a temporary name, then
    ``os.replace``)."""
    root = Path(root)
    if not (root / version / CARD_NAME).is_file():
        raise MrisError(
            f"cannot publish {version}: {root / version} is not a finished index bundle"
        )
    tmp = root / f".{CURRENT}-{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(version, tmp)
    try:
        os.replace(tmp, root / CURRENT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(root)


@dataclass
class VersionInfo:
    version: str
    path: Path
    current: bool
    size_bytes: int


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_versions(root: str | Path) -> list[VersionInfo]:
    """Finished versions (folders with a card), oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise MrisError(f"index root {root} does not exist")
    current = current_version(root)
    infos = []
    for entry in sorted(root.iterdir()):
        if (
            entry.is_dir()
            and not entry.is_symlink()
            and is_version_name(entry.name)
            and (entry / CARD_NAME).is_file()
        ):
            infos.append(VersionInfo(entry.name, entry, entry.name == current, dir_size(entry)))
    return infos


def gc(root: str | Path, keep: int) -> list[str]:
    """Remove all but the ``keep`` newest versions; ``current`` is never removed (it is kept in
    addition when it is older). A removed folder is first renamed to ``.deleting-*`` so a
    half-deleted bundle never looks whole. Returns the removed version names."""
    if keep < 1:
        raise MrisError("--keep must be at least 1")
    root = Path(root)
    versions = list_versions(root)
    current = current_version(root)
    survivors = {v.version for v in versions[-keep:]}
    if current:
        survivors.add(current)
    removed = []
    for info in versions:
        if info.version in survivors:
            continue
        doomed = root / f"{DELETING_PREFIX}{info.version}-{os.getpid()}"
        os.rename(info.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(info.version)
    fsync_dir(root)
    return removed
