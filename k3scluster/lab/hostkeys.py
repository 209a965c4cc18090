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


def names_host(line: str, host: str) -> bool:
    """Does this known_hosts line hold a key of ``host`` (any port)?"""
    fields = line.split()
    if not fields or line.lstrip().startswith("#"):
        return False
    first = fields[0]
    if first.startswith("@"):  # @cert-authority / @revoked: the host patterns come next
        if len(fields) < 2:
            return False
        first = fields[1]
    for pattern in first.split(","):
        if pattern.startswith("|"):
            if _hashed_match(pattern, host):
                return True
        elif pattern == host or (pattern.startswith(f"[{host}]:")):
            return True
    return False


def forget_host(known_hosts: Path, host: str) -> int:
    """Remove every line of ``known_hosts`` that holds a key of ``host``; how many."""
    try:
        lines = known_hosts.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    keep = [ln for ln in lines if not names_host(ln, host)]
    dropped = len(lines) - len(keep)
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
