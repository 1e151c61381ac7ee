"""Write beside, swap when whole: a retrained record never replaces a finished one half-written.

A head's record (``head.keras``, ``config.json``, ``metrics.json``, ``faces.csv``, ``baselines*``, plots)
is written into a staging folder that mirrors the results tree (``{results}/.staging/{pid}-{id}/...``)
and moved into place by :meth:`Stage.install` only once it is complete. Where the place is taken, the
two folders are exchanged in one ``renameat2(RENAME_EXCHANGE)`` call (Linux), so the old record stays
whole until the instant the new one is whole; elsewhere the old folder is first renamed aside to
``.{name}.old-{id}`` and :func:`recover` puts it back if the process died between the two renames.
Paths that the staged files record (``metrics.json`` ``head_dir``, a summary's ``members``) are
rewritten to the final place before the swap. Whatever is left staged when the process ends
(interrupted, killed) is discarded: by :class:`Stage` on exit, or by the next :class:`Stage` of the
same results folder once its process is gone.

Also here, for the command line's one line on Ctrl-C: :func:`keep` notes what an interrupted command
keeps (the CLI prints :func:`kept`), and :func:`checkpoint`, a test hook that signals the process at a
named point (``FEATLAB_KILL_AT=point[:n][:SIGNAL]``, e.g. ``record:2:SIGKILL``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import uuid
from pathlib import Path

STAGING = ".staging"
_OLD = ".old-"


# ----------------------------------------------------------------------------- swapping folders
def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def recover(final: Path) -> None:
    """Undo a swap cut between its two renames (non-Linux fallback): put ``final``'s old folder back
    where ``final`` is missing; drop stale old copies where it is there."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    olds = sorted(final.parent.glob(f".{final.name}{_OLD}*"), key=lambda p: p.stat().st_mtime)
    for i, old in enumerate(olds):
        if not final.exists() and i == len(olds) - 1:
            os.rename(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def swap_in(new: Path, final: Path) -> None:
    """Move the complete folder ``new`` to ``final``, replacing what is there in one step."""
    new, final = Path(new), Path(final)
    recover(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)  # now the old record
        return
    old = final.parent / f".{final.name}{_OLD}{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _relocate(folder: Path, staged_root: Path, final_root: Path) -> None:
    """Rewrite the staged paths recorded in ``folder``'s JSON files to their final place."""
    a, b = str(staged_root.resolve()), str(final_root.resolve())
    for f in folder.rglob("*.json"):
        text = f.read_text()
        if a in text:
            f.write_text(text.replace(a, b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final_root: Path) -> None:
    """Remove the staging folders of ``final_root`` left by processes that are gone."""
    base = Path(final_root) / STAGING
    if not base.is_dir():
        return
    for d in base.iterdir():
        pid = d.name.split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


class Stage:
    """A staging folder mirroring ``final_root``: train and score into :attr:`root`, then
    :meth:`install` each complete record; the rest is discarded on exit."""

    def __init__(self, final_root):
        self.final_root = Path(final_root)
        self._made_final = not self.final_root.exists()  # a run that installs nothing leaves no results folder
        clean_stale(self.final_root)
        self.root = self.final_root / STAGING / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.root.mkdir(parents=True)

    def final(self, staged) -> Path:
        """Where a staged path goes."""
        return self.final_root / Path(staged).relative_to(self.root)

    def install(self, staged) -> Path:
        staged = Path(staged)
        final = self.final(staged)
        _relocate(staged, self.root, self.final_root)
        checkpoint("install")
        swap_in(staged, final)
        return final

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for d in (self.root.parent, self.final_root) if self._made_final else (self.root.parent,):
            try:
                d.rmdir()  # the last one out removes .staging (and the results folder it made, if still empty)
            except OSError:
                pass


# ----------------------------------------------------------------------------- what an interruption keeps
_kept: dict[str, str] = {}


def keep(what: str, text: str | None) -> None:
    """Note (or, with None, forget) what an interrupted command keeps, under ``what``."""
    if text is None:
        _kept.pop(what, None)
    else:
        _kept[what] = text


def kept() -> list[str]:
    return list(_kept.values())


def reset() -> None:
    _kept.clear()
    _hits.clear()


_hits: dict[str, int] = {}


def checkpoint(name: str) -> None:
    """Test hook: with ``FEATLAB_KILL_AT=name[:n][:SIGNAL]`` the process sends itself SIGNAL (SIGINT by
    default) the n-th time (default 1) it passes ``name``."""
    spec = os.environ.get("FEATLAB_KILL_AT")
    if not spec or spec.split(":", 1)[0] != name:
        return
    parts = spec.split(":")
    n = int(parts[1]) if len(parts) > 1 and parts[1] else 1
    sig = getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGINT
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == n:
        os.kill(os.getpid(), sig)
