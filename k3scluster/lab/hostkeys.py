"""Drop a host's keys from a known_hosts file (a VM that was deleted or installed again has
new host keys; its old ones would make ssh refuse it, ``StrictHostKeyChecking=accept-new``).

Plain entries are matched for the host on any port (``ip``, ``[ip]:port``), hashed ones
(``|1|salt|hmac``, ssh's ``HashKnownHosts``) for port 22, the one the project's ssh uses. The file keeps its mode and is
replaced atomically; nothing else in it changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import tempfile
from pathlib import Path


def _hashed_match(pattern: str, host: str) -> bool:
    try:
        _, magic, salt, digest = pattern.split("|")
        key, want = base64.b64decode(salt), base64.b64decode(digest)
    except (ValueError, binascii.Error):
        return False
    if magic != "1":
        return False
    return hmac.compare_digest(hmac.new(key, host.encode(), hashlib.sha1).digest(), want)


def _pattern_names(pattern: str, host: str) -> bool:
    if pattern.startswith("|"):
        return _hashed_match(pattern, host)
    return pattern == host or pattern.startswith(f"[{host}]:")


def names_host(line: str, host: str) -> bool:
    """Does this known_hosts line hold a key of ``host`` (any port)?"""
    return _without_host(line, host) != line


def _without_host(line: str, host: str) -> str | None:
    """``line`` without ``host``'s patterns: the same line when it names no key of
    ``host``, None when nothing else is left of it; a line that names other hosts too
    (``ip,name key``) keeps them and its key."""
    fields = list(re.finditer(r"\S+", line))
    if not fields or fields[0].group().startswith("#"):
        return line
    at = 1 if fields[0].group().startswith("@") else 0  # @cert-authority / @revoked
    if len(fields) <= at:
        return line
    patterns = fields[at].group().split(",")
    keep = [p for p in patterns if not _pattern_names(p, host)]
    if len(keep) == len(patterns):
        return line
    if not keep:
        return None
    return line[: fields[at].start()] + ",".join(keep) + line[fields[at].end() :]


def forget_host(known_hosts: Path, host: str) -> int:
    """Remove ``host`` from every line of ``known_hosts`` that holds a key of it (the line,
    when it names no other host); how many lines changed."""
    try:
        lines = known_hosts.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    changed = [(ln, _without_host(ln, host)) for ln in lines]
    keep = [new for _, new in changed if new is not None]
    dropped = sum(1 for old, new in changed if new != old)
    if dropped:
        mode = known_hosts.stat().st_mode & 0o777
        fd, tmp = tempfile.mkstemp(prefix=f".{known_hosts.name}.", dir=known_hosts.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(keep)
            os.chmod(tmp, mode)
            os.replace(tmp, known_hosts)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return dropped
