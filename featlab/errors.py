"""User-facing errors: one clear line at the CLI, never a traceback."""

from __future__ import annotations

import errno
import os
import re


def did_you_mean(word: str, names, n: int = 2, cutoff: float = 0.6) -> str:
    """``did you mean 'x'? `` (or ``'x' or 'y'``) for the (at most ``n``) names nearest ``word``; '' when none
    is near (difflib's ratio below ``cutoff``)."""
    import difflib

    near = difflib.get_close_matches(str(word), [str(x) for x in names], n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""


class FeatlabError(Exception):
    """An error whose message is meant for the user as-is (the CLI prints it and exits 2)."""


class DiskFull(FeatlabError):
    """A write refused for lack of space (or over the file size limit, or the disk quota): the message names
    the file, what filled up and what is kept. ``resumes``: the same command goes on from what is kept (else it
    starts over). The CLI adds the command to run once space is freed."""

    def __init__(self, message: str, resumes: bool = True):
        super().__init__(message)
        self.message, self.resumes = message, resumes

    def __str__(self) -> str:
        return (f"{self.message}; free space, then run the same command again"
                + (" (it resumes)" if self.resumes else ""))


#: errno of a write refused because something filled up -> what filled up
FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file size limit reached",
               errno.EDQUOT: "disk quota exceeded"}
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")  # HDF5's back trace: "... errno = 28, error message = ..."
_FILE_IN_TEXT = re.compile(r"filename = '([^']*)'")


def disk_full(e: BaseException | None) -> tuple[str, str | None] | None:
    """``(what filled up, the file being written or None)`` when ``e`` or an exception it came from is a write
    refused for lack of space (``OSError`` ENOSPC/EFBIG/EDQUOT, or an HDF5 error whose back trace holds one of
    them); None otherwise."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        text = str(e)
        if code not in FULL_ERRNOS:
            m = _ERRNO_IN_TEXT.search(text)
            code = int(m.group(1)) if m else None
        if code in FULL_ERRNOS:
            name = getattr(e, "filename", None) if isinstance(e, OSError) else None
            if not name:
                m = _FILE_IN_TEXT.search(text)
                name = m.group(1) if m else None
            return FULL_ERRNOS[code], (os.fsdecode(name) if name else None)
        e = e.__cause__ or e.__context__
    return None


def filled_up(what: str, path) -> str:
    """``what`` said of ``path``'s filesystem: ``no space left on device (the filesystem at /mnt/x)``."""
    if what != FULL_ERRNOS[errno.ENOSPC] or not path:
        return what
    p = os.path.abspath(os.fsdecode(path))
    while not os.path.ismount(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return f"{what} (the filesystem at {p} is full)"


def copy_disk_full(e: BaseException, out, partial, after: str = "", kept: str = "") -> DiskFull | None:
    """For a whole-file copy into ``out`` that failed: remove the ``partial`` copy, and give the one-line
    :class:`DiskFull` (``{out}: {what filled up}{after}; nothing written (the partial copy is removed{kept})``)
    when ``e`` is a full disk, else None (the caller re-raises ``e``)."""
    from pathlib import Path

    Path(partial).unlink(missing_ok=True)
    full = disk_full(e) if isinstance(e, Exception) else None
    if full is None:
        return None
    return DiskFull(f"{out}: {filled_up(full[0], Path(out).parent)}{after}; nothing written "
                    f"(the partial copy is removed{kept})", resumes=False)
