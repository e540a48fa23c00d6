"""Writing files so that a failure never costs what was there: checked before any work,
written to a temporary file beside the target, published in one step.

- :func:`check_writable` creates and removes a file in the target's folder, so a read-only
  or missing-permission folder is found before minutes of training, not after.
- :func:`write_atomically` writes through a hidden ``.<name>.*.partial`` in the same folder
  (removed on any failure, a full disk or a signal included) and then publishes it: with
  ``overwrite`` by ``os.replace``, without it by ``os.link``, which fails if the target has
  appeared in the meantime (a second run finishing into the same path), so an existing file
  is never replaced unasked. The file gets the user's umask, as ``open`` would give it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_path(path, what: str = "path") -> Path:
    """``path`` (a ``str`` or ``os.PathLike``) as a ``Path``, or ``ValueError`` naming what was given."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} must be a file path (str or pathlib.Path), got {type(path).__name__} {path!r:.60}")
    return Path(path)


def check_parent_folder(path: Path) -> None:
    """Raise ``ValueError`` if a folder on the way to ``path`` exists as a file."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
            return


def check_writable(path) -> None:
    """Raise ``ValueError`` unless a file can be created in ``path``'s folder (made if missing):
    a probe file is created there and removed at once."""
    path = Path(path)
    check_parent_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"cannot write {path}: its folder {path.parent} is not writable "
                         f"({err.strerror or err}); choose another path") from None


def _cause(err: BaseException) -> str:
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text:
        return "no space left on the device"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    first = text.splitlines()[0] if text else type(err).__name__
    return f"{first} (is the disk full?)" if isinstance(err, RuntimeError) else first


def _publish_new(tmp: str, path: Path, exists_message: str) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, atomically."""
    try:
        os.link(tmp, path)  # fails if path exists: never replaces a file unasked
    except FileExistsError:
        raise FileExistsError(exists_message) from None
    except OSError as err:  # a file system without hard links: claim the name exclusively, then fill it
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise FileExistsError(exists_message) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_atomically(path, write: Callable, *, overwrite: bool, replace_hint: str = "overwrite=True") -> Path:
    """Write ``path`` with ``write(binary file)`` through a temporary file in the same folder.

    Without ``overwrite`` an existing ``path`` raises ``FileExistsError`` (the message names
    ``replace_hint``, e.g. ``--force`` for the CLI), also when it appears while writing. A
    failure to write (a full disk, a quota) raises ``OSError`` naming the file and the cause;
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    exists_message = f"{path} already exists; pass {replace_hint} to replace it, or choose another path"
    if path.exists() and not overwrite:
        raise FileExistsError(exists_message)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            try:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
                failure = OSError(f"could not write {path}: {_cause(err)}")  # one line, the file and the cause
                failure.errno = getattr(err, "errno", None) or errno.EIO
                raise failure from None
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path, exists_message)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
