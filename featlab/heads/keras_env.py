"""The one place featlab imports TensorFlow and Keras.

Every module that trains or runs a head gets Keras from :func:`keras`; nothing
else in featlab imports TensorFlow, so the data commands never pay for it.

TensorFlow 2.21 talks on stderr in a run that succeeds:

- at import, from its C++ core (straight to file descriptor 2, before absl
  logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not reach them):
  ``WARNING: All log messages before absl::InitializeLog() is called are
  written to STDERR`` and ``I0000 ... port.cc:...] oneDNN custom operations
  are on ...`` (twice: two shared libraries log it);
- during every ``fit``: ``E0000 ... node_def_util.cc:...] NodeDef mentions
  attribute use_unbounded_threadpool ...`` (a tf.data op attribute the C++
  op registry does not know; harmless) and, at import, the
  ``cpu_feature_guard`` notice.

:func:`keras` sets ``TF_CPP_MIN_LOG_LEVEL=3`` (fatal only) unless the user
set it to 0 or to 3 and above (1 and 2 are raised to 3), which silences the C++ lines logged after import, and runs the
import itself with file descriptor 2 captured, then writes back every line
except the few listed in :data:`HARMLESS`. Real failures still surface: they
are Python exceptions (and anything unexpected printed during the import is
passed through). Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see everything
TensorFlow says, unfiltered. oneDNN stays on (``TF_ENABLE_ONEDNN_OPTS`` is
left alone: turning it off would change the numbers of trained heads).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

#: Lines TensorFlow prints on stderr in runs that succeed; nothing else is ever dropped.
HARMLESS = (
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"),
    re.compile(rb"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\b"),
    re.compile(rb"^I\d{4} [\d:. ]+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized\b"),
    re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.\s*$"),
    re.compile(rb"^E\d{4} [\d:. ]+\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool\b"),
)


def is_harmless(line: bytes | str) -> bool:
    """Whether a stderr line is one of TensorFlow's known harmless notices (see :data:`HARMLESS`)."""
    if isinstance(line, str):
        line = line.encode("utf-8", "replace")
    return any(p.search(line) for p in HARMLESS)


def configure_environment() -> bool:
    """Set TensorFlow's logging environment before its import; True when featlab should filter.

    ``TF_CPP_MIN_LOG_LEVEL=0`` is the one way to ask for everything TensorFlow says (unfiltered, left as is).
    Any other value below 3 (1 and 2, common in shell profiles to hide INFO or WARNING lines) still shows
    TensorFlow's harmless ``E0000 ... node_def_util.cc`` line during every fit, so it is raised to 3 (fatal
    only) like an unset or unreadable value; 3 and above are kept."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip()
    if level == "0":
        return False
    try:
        keep = int(level) >= 3
    except ValueError:
        keep = False
    if not keep:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return True


@contextlib.contextmanager
def harmless_lines_dropped():
    """Capture file descriptor 2 (where TensorFlow's C++ core writes) for the block, then write back every
    line that is not in :data:`HARMLESS`, in order. For short blocks only (an import): output is held until
    the block ends."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                kept = [line for line in tmp.read().splitlines(keepends=True) if not is_harmless(line)]
                if kept:
                    os.write(2, b"".join(kept))
    finally:
        os.close(saved)


def keras():
    """Import Keras (and TensorFlow) quietly; Python exceptions and unexpected messages still surface."""
    if "keras" in sys.modules and "tensorflow" in sys.modules:
        import keras as _k

        return _k
    quiet = configure_environment()
    with harmless_lines_dropped() if quiet else contextlib.nullcontext():
        import keras as _k
        import tensorflow  # noqa: F401  (keras imports it lazily on some paths: pay for it, and its notices, here)
    return _k


def tensorflow():
    """TensorFlow itself, imported the same quiet way (for code that needs ``tf.config`` and the like)."""
    keras()
    import tensorflow as _tf

    return _tf
