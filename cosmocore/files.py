"""Files the pipeline writes and compares.

`atomic_path` is the one way to write a file or a folder so that a crash at any moment leaves the old
one or the new one, never a torn one: everything the pipeline persists (task tables, trajectories,
buffers, checkpoints, taggers, metrics JSON, the tokenizer cache) goes through it. `file_digest`
fingerprints files (what a saved training state was made with, which policy was evaluated)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cosmocore.errors import DiskFull

NEARLY_FULL_BYTES = 1 << 20  # less free than this after a failed write: the disk filled up


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same folder, so the rename cannot cross file systems);
    write the file or folder there. When the block ends normally it is flushed to disk and renamed
    onto `path`; when it raises, the temporary is removed and `path` is left as it was (an error that
    came from a full disk is raised as `DiskFull`, chained to the original).

    `overwrite=False` keeps an existing `path` and drops the new one (first writer wins: caches that
    concurrent processes may fill with the same content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        if not overwrite and path.exists():
            _remove(tmp)
            return
        _fsync(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # make the rename itself durable
    except Exception as error:
        full = _out_of_space(error, path.parent)
        _remove(tmp)
        if full:
            raise DiskFull(errno.ENOSPC, f"no space left on the disk holding {path.parent} while writing {path.name} "
                           f"({type(error).__name__}: {error}); {path} was left as it was. Free space there (or "
                           "move the data folder to a larger disk) and run the stage again") from error
        raise
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """`payload` as indented JSON with sorted keys (numpy and other floats as plain numbers)."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")


def write_frame(path: str | os.PathLike, frame) -> Path:
    """A pandas DataFrame, without its index, as parquet or (any other suffix) csv."""
    with atomic_path(path) as tmp:
        (frame.to_parquet if Path(path).suffix == ".parquet" else frame.to_csv)(tmp, index=False)
    return Path(path)


def file_digest(paths: Iterable[str | os.PathLike]) -> str:
    """A short digest of the files' names and bytes (a folder: every file in it, recursively, byte-code
    caches left out)."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() else [path]
        for file in files:
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def _out_of_space(error: Exception, folder: Path) -> bool:
    """Whether `error` came from a full disk: ENOSPC or EDQUOT, or, for writers that word it their own
    way (torch.save: "unexpected pos"), next to nothing left free where it was writing."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize < NEARLY_FULL_BYTES


def _fsync(path: Path) -> None:
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
