"""One error type for everything a user can get wrong, and the explanations of other libraries' errors on bad input.

The CLI turns a SlimlmError into a single line on stderr and exit code 2. Errors that parsers, the allocator or the
file system raise on bad input (``explain``) are the user's too, explained at that one boundary; anything else is a
bug: one line and exit 1, with the traceback under ``--debug``.
"""

from __future__ import annotations

import errno
import json
import re
import struct


class SlimlmError(Exception):
    """Bad input or an impossible request, with a message meant for the user."""


_OS_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "the file size limit was reached", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def explain(exc: BaseException) -> str | None:
    """One line saying what bad input or environment made a third-party parser, the allocator or the OS fail, or
    None when ``exc`` is not such an error (then it is a bug, and should be reported as one)."""
    if isinstance(exc, SlimlmError):
        return str(exc)
    if isinstance(exc, RuntimeError) and "file write failed" in str(exc):
        return os_reason(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return "ran out of memory: the input asks for more than this machine has (a corrupt or lying header?)"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to parse (a corrupt or hostile file?)"
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{os_reason(exc)}"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({_first_line(exc)})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 text ({_first_line(exc)})"
    if isinstance(exc, struct.error):
        return f"truncated or corrupt binary data ({_first_line(exc)})"
    if type(exc).__name__ == "SafetensorError":
        if _rust_errno(exc) is not None:
            return f"reading or writing a safetensors file failed: {os_reason(exc)}"
        return f"corrupt safetensors file ({_first_line(exc)})"
    return None


def os_reason(exc: BaseException) -> str:
    """Why a read or write failed, in words (the disk is full, permission denied, ...), for an OSError or the
    Rust io::Error inside a safetensors error."""
    if isinstance(exc, RuntimeError) and "file write failed" in str(exc):  # torch.save's writer gives no errno
        return "the write failed (is the disk full, or a file size limit reached?)"
    code = exc.errno if isinstance(exc, OSError) else _rust_errno(exc)
    if code in _OS_REASONS:
        return _OS_REASONS[code]
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or _first_line(exc)


def write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS refusing a write (a full disk, a size limit, permissions), as Python, the Rust
    inside safetensors or torch.save's C++ writer report it."""
    return (isinstance(exc, OSError) and exc.errno is not None) or _rust_errno(exc) is not None or (
        isinstance(exc, RuntimeError) and "file write failed" in str(exc))


def _rust_errno(exc: BaseException) -> int | None:
    found = re.search(r"IoError\(Os \{ code: (\d+)|\(os error (\d+)\)", str(exc))
    return int(found.group(1) or found.group(2)) if found else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
