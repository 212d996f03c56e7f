"""Atomic file writes, hashing, output locks, the regular-file check and the output-path check.

A run that is killed (SIGKILL included) at any moment must never leave a half-written file that later
loads. Every file certkit produces is therefore written to a temporary file in the same directory, flushed,
fsync'ed and renamed over the target: readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from certkit.errors import CertkitError, first_line


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or absent/unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask), so checkpoints and
        # results are as readable to a lab's group as any other file its members write
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Delete what a killed :func:`atomic_write_bytes` left of ``names`` in ``folder`` (SIGKILL runs no
    clean-up: a resume state's temporary is as large as the state). Only for a caller holding the folder's
    :class:`PidLock`, since a live writer's temporary has the same form."""
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk; not every OS allows this.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's SHA-256; a file that cannot be read (permissions, an I/O error) is the user's to fix."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        raise CertkitError(f"{path}: cannot read it ({e.strerror or e})") from None
    return h.hexdigest()


def parse_json(text: str, where: str) -> Any:
    """``text`` parsed as JSON; text that is not JSON, or nests deeper than the parser's recursion allows (a
    crafted file of a hundred thousand brackets), is refused in one line naming ``where``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CertkitError(f"{where}: not valid JSON ({first_line(e)})") from None


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of file ``path`` (the ``what``, for the messages): a file that is not regular, cannot
    be read or is not UTF-8 is refused in one line. A missing file is the caller's to word (each names what
    should be there), so it is checked before this is called."""
    require_regular(path, what)
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CertkitError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise CertkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON document in file ``path``: :func:`read_text`, then :func:`parse_json`."""
    return parse_json(read_text(path, what), str(path))


def resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with its symlinks followed; a symlink loop is refused in one line (Python 3.11
    raises RuntimeError for one, later versions OSError)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:
        raise CertkitError(f"{path}: cannot resolve it ({first_line(e)})") from None


def require_regular(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse a path that exists but is not a regular file (a FIFO, a device, a directory, or a symlink to
    one): opening a FIFO blocks forever and reading ``/dev/zero`` never ends, so this is checked before any
    work. A path that does not exist yet is fine (it will be created as a regular file)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise CertkitError(f"{path}: cannot use it as the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise CertkitError(f"{path}: is {kind}; the {what} must be a regular file")


#: pseudo-file systems: writing there changes the kernel's state or fails late, never stores a result
SYSTEM_TREES = (Path("/proc"), Path("/sys"))


def check_output(path: str | os.PathLike, flag: str, *, directory: bool = False) -> Path:
    """Refuse an output path that could only fail after the work is done: empty, under /proc or /sys, of the
    wrong kind (a directory where a file goes, a file where a run directory goes, a FIFO or device), or
    whose parent is missing or not writable. Checked before any data is read or any model trained."""
    if not str(path).strip():
        raise CertkitError(f"{flag} is empty; give a {'directory' if directory else 'file'} path")
    target = Path(path)
    absolute = resolved(target)
    for tree in SYSTEM_TREES:
        if absolute == tree or tree in absolute.parents:
            raise CertkitError(f"{flag} {path}: under {tree}, a kernel file system; choose a normal folder")
    if directory:
        if target.exists() and not target.is_dir():
            raise CertkitError(f"{flag} {path}: exists and is not a directory; {flag} names a run directory")
    else:
        require_regular(target, f"{flag} file")
    existing = target if directory and target.is_dir() else absolute.parent
    if not directory and not existing.is_dir():
        raise CertkitError(f"{flag} {path}: its folder {existing} does not exist")
    while directory and not existing.exists():  # a run directory is created with its parents
        existing = existing.parent
    if not existing.is_dir():
        raise CertkitError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CertkitError(f"{flag} {path}: cannot write in {existing} (permission denied)")
    return target


def lock_path(target: str | os.PathLike) -> Path:
    """The lock of ``target``: ``<target>.lock`` beside it."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class PidLock:
    """Exclusive use of one output (a result file, a run directory) by one process at a time.

    Two processes appending to the same result file interleave their rows, and the file then lies about
    which indices are done. The lock is ``<target>.lock``, created with O_CREAT|O_EXCL and holding the
    holder's pid; a second process finds it and refuses. A lock whose pid no longer runs (the holder was
    killed) is taken over. The lock only works between processes of one machine that see the same pids.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.path = lock_path(target)
        self.held = False

    def acquire(self) -> PidLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = f"{os.getpid()}\n".encode()
        for _ in range(3):  # each retry follows the removal of a dead holder's lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or _pid_alive(holder):
                    raise CertkitError(
                        f"{self.target} is in use by {f'process {holder}' if holder else 'another process'} "
                        f"(lock {self.path}); wait for it to finish, or remove the lock if no certkit runs there"
                    ) from None
                self._remove_if_held_by(holder)
                continue
            except OSError as e:
                raise CertkitError(f"{self.path}: cannot create the lock ({e.strerror or e})") from None
            try:
                os.write(fd, mine)
            finally:
                os.close(fd)
            self.held = True
            return self
        raise CertkitError(f"{self.target}: could not take the lock {self.path}; another process keeps taking it")

    def _holder(self) -> int | None:
        """The pid in the lock; None while it is being written (or unreadable): then it counts as held."""
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _remove_if_held_by(self, pid: int) -> None:
        # read again right before removing: another process may have just taken the stale lock over
        if self._holder() == pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def release(self) -> None:
        if self.held:
            self.held = False
            self._remove_if_held_by(os.getpid())

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
