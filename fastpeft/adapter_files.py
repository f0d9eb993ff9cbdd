"""Atomic adapter directories: write every file of a save in a scratch directory, then put it in place at once.

Everything is written and fsynced in a scratch directory beside the target, which then takes the target's
place in one rename (Linux: an atomic exchange with an existing directory), so a crash never leaves a
half-written adapter where the old one was. Other files of an existing target (a README, other adapters'
subfolders) are carried over by hard links, the target keeps its mode, and a target that is a symlink is
followed. Scratch directories are named .<target>.<tmp|old>-<pid>-<random>; the next save removes those whose
process is gone and that no process holds locked, so a killed save leaves nothing for good.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import stat
import sys
from typing import Callable


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _carry_over(old: str, new: str, replaced: set[str]) -> None:
    """Keep the old directory's other files (a README, other adapters' subfolders) by hard links."""
    for entry in os.listdir(old):
        if entry in replaced:
            continue
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _replace_dir(tmp: str, target: str) -> None:
    """Put the complete directory `tmp` at `target`; the old target, if any, ends up deleted."""
    parent = os.path.dirname(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        _rmtree(tmp)  # tmp now holds the old adapter
    else:  # two renames; between them the old adapter is complete under the backup name
        backup = _scratch_name(parent, os.path.basename(target), "old")
        os.rename(target, backup)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup, target)
            raise
        _rmtree(backup)
    fsync_path(parent)


def _rmtree(path: str) -> None:
    """Delete a directory tree of ours even if it is read-only (an adapter directory saved with mode 0o555);
    what cannot be deleted stays, for the stale-scratch cleanup of a later save."""
    for root, _, _ in os.walk(path):  # top-down: each directory is made writable before it is emptied
        try:
            os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) | stat.S_IRWXU)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def _scratch_name(parent: str, base: str, kind: str) -> str:
    return os.path.join(parent, f".{base}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _make_scratch_dir(parent: str, base: str) -> tuple[str, int | None]:
    """A new directory for the save in progress (mode as mkdir makes it), and an fd holding a lock on it."""
    while True:
        path = _scratch_name(parent, base, "tmp")
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            continue
    try:
        import fcntl
    except ImportError:
        return path, None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without locks: the process id alone marks the directory as in use
        os.close(fd)
        return path, None
    return path, fd


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a save in progress in another thread of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: it exists, as another user's process
        return False
    return False


def _unlocked(path: str) -> bool:
    """True unless some process (on this machine or, over a network filesystem, another) holds `path` locked."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_stale_scratch(parent: str, base: str) -> None:
    """Remove the scratch directories that saves to `base` killed mid-write left in `parent`."""
    if os.name != "posix":  # os.kill(pid, 0) is no liveness probe elsewhere
        return
    pattern = re.compile(rf"\.{re.escape(base)}\.(?:tmp|old)-(\d+)-[0-9a-f]+")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry)
        path = os.path.join(parent, entry)
        if m and _process_gone(int(m.group(1))) and not os.path.islink(path) and os.path.isdir(path) \
                and _unlocked(path):
            _rmtree(path)


def write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON (sorted keys) and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_directory(directory: str | os.PathLike, write: Callable[[str], None], replaced: set[str]) -> str:
    """Make `directory` hold what `write(scratch)` writes, atomically; returns the directory written (a
    symlink's target for a symlink). Files of an existing directory named in `replaced` are dropped, the
    others kept. `write` must fsync the files it writes; if it raises, the old directory stays as it was."""
    target = os.path.abspath(os.fspath(directory))
    if os.path.islink(target):  # save where the link points; the link itself stays
        target = os.path.realpath(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"directory: {target} exists and is not a directory")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else None
    tmp, lock = _make_scratch_dir(parent, base)
    try:
        write(tmp)
        if os.path.isdir(target):
            _carry_over(target, tmp, replaced)
        if mode is not None:  # last: the old mode may not let us write into it
            os.chmod(tmp, mode)
        fsync_path(tmp)
        _replace_dir(tmp, target)
    finally:
        if os.path.lexists(tmp):
            _rmtree(tmp)
        if lock is not None:
            os.close(lock)
    _remove_stale_scratch(parent, base)
    return target


__all__ = ["write_directory", "write_json", "fsync_path"]
