"""A real PostgreSQL server of a test's own (Debian's ``postgresql``), for Pulumi's
``postgres://`` state backend.

:class:`Postgres` runs ``initdb`` and ``pg_ctl`` in a fresh directory under ``/tmp``, as the
``postgres`` system user (the server refuses to run as root), listening on a unix socket in
that directory only (no TCP: it is reached from the engine's network namespace through the
file system, and from nothing else). :meth:`Postgres.stop` stops it (``-m immediate``) and
removes the directory; nothing is left running.

    with Postgres.start() as pg:
        env = {"PULUMI_BACKEND_URL": pg.url}
"""

from __future__ import annotations

import glob
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

USER = "postgres"


def bindir() -> Path | None:
    """Debian's server binaries (``/usr/lib/postgresql/<major>/bin``), the newest major."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def available() -> str | None:
    """Why a server cannot be started here, or None."""
    if bindir() is None:
        return "PostgreSQL server binaries missing (Debian package postgresql; scripts/setup)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER} user (Debian's postgresql package makes it)"
    if shutil.which("runuser") is None:
        return "runuser (util-linux) missing"
    return None


class Postgres:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.sock = base / "sock"
        self.log = base / "server.log"
        self.bin = bindir() or Path("/nonexistent")

    @property
    def url(self) -> str:
        """Pulumi's ``postgres://`` backend URL (lib/pq: the socket directory as ``host``)."""
        return f"postgres://{USER}@/postgres?host={self.sock}&sslmode=disable"

    def _as_user(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", USER, "--", *argv],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.base,
        )

    @classmethod
    def start(cls) -> Postgres:
        base = Path(tempfile.mkdtemp(prefix="k3scluster-pg-"))
        pg = cls(base)
        try:
            pg.sock.mkdir()
            uid, gid = pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid
            for p in (base, pg.sock):
                shutil.chown(p, uid, gid)
            r = pg._as_user(
                str(pg.bin / "initdb"), "-D", str(pg.data), "-U", USER, "--auth=trust", "-E", "UTF8"
            )
            assert r.returncode == 0, r.stdout + r.stderr
            r = pg._as_user(
                str(pg.bin / "pg_ctl"), "-D", str(pg.data), "-l", str(pg.log), "-w", "-t", "60",
                "-o", f"-c listen_addresses= -c unix_socket_directories={pg.sock}",
                "start",
            )
            assert r.returncode == 0, r.stdout + r.stderr + pg.log.read_text(errors="replace")
        except BaseException:
            pg.stop()
            raise
        return pg

    def sql(self, query: str) -> str:
        """Run ``query`` with psql; its rows, unaligned, ``|`` between columns."""
        r = self._as_user(
            str(self.bin / "psql"), "-h", str(self.sock), "-d", "postgres", "-At", "-c", query
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_user(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
