"""Reading the cluster directory's files: missing, unreadable, binary, not UTF-8."""

from __future__ import annotations

from pathlib import Path

from k3scluster.plans.context import Context

HOSTS_CSV = "plans/hosts.csv"
K3S_CSV = "plans/k3s.csv"
NETWORK_YAML = "plans/network.yaml"

INIT_HINT = "`k3scluster init DIR` creates the missing files without touching existing ones"


class Files(Context):
    def check_root(self) -> bool:
        """Whether the cluster directory is a directory (an error when it is not)."""
        root = self.root
        if root.is_dir():
            return True
        what = "is not a directory" if root.exists() else "does not exist"
        self.error(
            "cluster-dir",
            str(root),
            0,
            f"the cluster directory {what}",
            f"give the path of a cluster directory; {INIT_HINT}",
        )
        return False

    def read_text(self, rel: str, *, required: bool) -> str | None:
        """The UTF-8 text of ``rel``, or None (with a diagnostic when it is a mistake)."""
        path = self.root / rel
        if not path.exists():
            if required:
                self.error("file-missing", rel, 0, "missing file", INIT_HINT)
            return None
        data = self.read_file(rel, path)
        return None if data is None else self.decode(rel, data)

    def read_file(self, rel: str, path: Path) -> bytes | None:
        """The bytes of a regular file, or None with a diagnostic saying why not."""
        if not path.is_file():
            self.error(
                "file-unreadable",
                rel,
                0,
                "is not a regular file (a directory?)",
                f"replace it with the file {rel}",
            )
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            self.error(
                "file-unreadable",
                rel,
                0,
                f"cannot be read: {exc.strerror}",
                "check the file's owner and permissions",
            )
            return None

    def decode(self, rel: str, data: bytes) -> str | None:
        nul = data.find(b"\0")
        if nul >= 0:
            self.error(
                "file-encoding",
                rel,
                data.count(b"\n", 0, nul) + 1,
                "binary data (a NUL byte), not a text file",
                "write the file as plain UTF-8 text",
            )
            return None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.error(
                "file-encoding",
                rel,
                data.count(b"\n", 0, exc.start) + 1,
                f"not UTF-8 text (byte 0x{data[exc.start]:02x})",
                "save the file as UTF-8 (in a spreadsheet: 'CSV UTF-8')",
            )
            return None

    def list_dir(self, rel: str) -> list[Path]:
        d = self.root / rel
        if not d.exists():
            return []
        if not d.is_dir():
            self.error(
                "dir-invalid",
                rel,
                0,
                "is not a directory",
                f"move the file away; {rel}/ is a directory",
            )
            return []
        try:
            return sorted(d.iterdir())
        except OSError as exc:
            self.error(
                "file-unreadable",
                rel,
                0,
                f"cannot be read: {exc.strerror}",
                "check the directory's owner and permissions",
            )
            return []
