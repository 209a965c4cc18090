"""secrets/: the K3s token and agent token, password hashes (passwd, HOSTpasswd) and ssh public keys (*.pub).

A secret's content never reaches a diagnostic: messages name the file, never what is in it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from k3scluster.model import Host, SecretFile, Secrets, SshKey
from k3scluster.plans.files import HOSTS_CSV, Files

_CRYPT = re.compile(r"^\$(y|gy|7|2[aby]|5|6)\$[A-Za-z0-9./$=,]{8,}$")
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)

_PASSWD_HINT = (
    "make a hash with `mkpasswd -m yescrypt` or `openssl passwd -6` and write it alone into "
    "secrets/passwd (every host) or secrets/<host>passwd (one host)"
)


@dataclass
class _Found:
    """The secrets read so far, and whose password files and keys exist (even broken ones)."""

    token: SecretFile | None = None
    agent_token: SecretFile | None = None
    # each token's value as K3s reads it (surrounding whitespace stripped), as a digest
    token_values: dict[str, str] = field(default_factory=dict)
    passwd: SecretFile | None = None
    host_passwd: dict[str, SecretFile] = field(default_factory=dict)
    keys: list[SshKey] = field(default_factory=list)
    passwd_owners: set[str] = field(default_factory=set)
    key_owners: set[str | None] = field(default_factory=set)


class SecretsReader(Files):
    def read_secrets(self, hosts: list[Host]) -> Secrets:
        sdir = self.root / "secrets"
        found = _Found()
        if not sdir.exists() and not sdir.is_symlink():
            self.error(
                "file-missing",
                "secrets",
                0,
                "missing directory: it holds the K3s token, the password hashes and the ssh "
                "public keys",
                "`k3scluster init DIR` creates it with a new token (for a cluster that runs "
                "already, restore secrets/ from your backup instead: K3s rejects a new token)",
            )
            return Secrets(token=None, passwd=None, host_passwd=(), ssh_keys=())
        for path in self._secret_entries(sdir):
            self._read_secret_entry(path, found)
        if not (sdir / "token").exists() and not (sdir / "token").is_symlink():
            self.error(
                "token-missing",
                "secrets/token",
                0,
                "missing K3s token",
                "`k3scluster init DIR` creates it; never regenerate the token of a "
                "cluster that exists (K3s rejects nodes with a new token)",
            )
        if not (sdir / "agent-token").exists() and not (sdir / "agent-token").is_symlink():
            self.warn(
                "agent-token-missing",
                "secrets/agent-token",
                0,
                "no K3s agent token: the agents join with secrets/token, which lets its "
                "holder join as a server (they get it in a directory of their own, as before)",
                "a cluster never deployed: `k3scluster init --agent-token DIR` adds one and "
                "changes nothing else. A cluster that runs: adding one is not known to be "
                "safe, since K3s keeps the "
                "servers' password file (where the agent token lives) in etcd too and a "
                "server whose file differs may refuse to restart ('passwd newer than "
                "datastore'); rehearse it on a copy first (README: \"The agent token\")",
            )
        values = found.token_values
        if "token" in values and values.get("token") == values.get("agent-token"):
            self.warn(
                "agent-token-same",
                "secrets/agent-token",
                0,
                "is the same as secrets/token: the agents hold the server token after all",
                "delete secrets/agent-token and run `k3scluster init DIR` for a new one; the "
                "next `pulumi up` gives it to the servers first, then to the agents",
            )
        self._check_missing(hosts, found)
        return Secrets(
            token=found.token,
            agent_token=found.agent_token,
            passwd=found.passwd,
            host_passwd=tuple(sorted(found.host_passwd.items())),
            ssh_keys=tuple(found.keys),
        )

    def _check_missing(self, hosts: list[Host], found: _Found) -> None:
        """Every host has a password hash and a key; when none has one, that is one error."""
        # a file that exists but is wrong is reported once, as invalid, not again as missing
        no_passwd = [h for h in hosts if not {"", h.name} & found.passwd_owners]
        if len(no_passwd) >= 2 and not found.passwd_owners:
            self.error(
                "passwd-missing",
                "secrets/passwd",
                0,
                f"missing: none of the {len(no_passwd)} hosts has a password hash",
                _PASSWD_HINT,
            )
            no_passwd = []
        for h in no_passwd:
            self.error(
                "passwd-missing",
                HOSTS_CSV,
                h.location.line,
                f"host {h.name!r} has no password hash",
                _PASSWD_HINT,
            )
        no_key = [h for h in hosts if not {None, h.name} & found.key_owners]
        if len(no_key) >= 2 and not found.key_owners:
            self.error(
                "ssh-key-missing",
                "secrets",
                0,
                f"no ssh public key (*.pub): nobody could log in to any of the {len(no_key)} hosts",
                "put your public key (a line of ~/.ssh/id_ed25519.pub) into secrets/<you>.pub "
                "(every host) or secrets/<host>.pub (one host)",
            )
            no_key = []
        for h in no_key:
            self.error(
                "ssh-key-missing",
                HOSTS_CSV,
                h.location.line,
                f"host {h.name!r} has no ssh public key: nobody could log in",
                f"put a public key into secrets/{h.name}.pub (this host) or "
                "secrets/<any>.pub (every host)",
            )

    def _secret_entries(self, sdir: Path) -> list[Path]:
        """The entries of secrets/ (none when it is absent or not a directory: reported)."""
        if sdir.exists() and not sdir.is_dir():
            self.error(
                "dir-invalid",
                "secrets",
                0,
                "is not a directory",
                "move the file away; secrets/ is a directory of secret files",
            )
        elif sdir.is_dir():
            try:
                return sorted(sdir.iterdir())
            except OSError as exc:
                self.error(
                    "file-unreadable",
                    "secrets",
                    0,
                    f"cannot be read: {exc.strerror}",
                    "check the directory's owner and permissions",
                )
        return []

    def _read_secret_entry(self, path: Path, found: _Found) -> None:
        """Read one entry of secrets/ into ``found`` (notes like README.md are skipped)."""
        name = path.name
        rel = f"secrets/{name}"
        lname = name.lower()
        kind = {"token": "token", "agent-token": "agent-token"}.get(name)
        owner: str | None = None
        if kind is None and lname.endswith("passwd"):
            kind, owner = "passwd", lname[: -len("passwd")]
            if owner and owner not in self.host_rows:
                if self.hosts_complete:
                    self.warn(
                        "passwd-unknown-host",
                        rel,
                        0,
                        f"password file for {owner!r}, which is not a host",
                        f"name it secrets/<host>passwd after a host of {HOSTS_CSV}, or "
                        "secrets/passwd for every host",
                    )
                return
            found.passwd_owners.add(owner)
        elif kind is None and lname.endswith(".pub"):
            kind, stem = "pub", lname[: -len(".pub")]
            owner = stem if stem in self.host_rows else None
            found.key_owners.add(owner)
        if kind is None:
            return  # README.md and other notes
        data = self.read_secret(rel, path, check_mode=kind != "pub")
        if data is None:
            return
        if kind == "token":
            if self.check_token(rel, data):
                found.token = SecretFile.from_path(self.root, path)
                found.token_values[kind] = hashlib.sha256(data.strip()).hexdigest()
        elif kind == "agent-token":
            if self.check_token(rel, data, rule="agent-token-invalid"):
                found.agent_token = SecretFile.from_path(self.root, path)
                found.token_values[kind] = hashlib.sha256(data.strip()).hexdigest()
        elif kind == "passwd":
            if self.check_passwd(rel, data):
                secret = SecretFile.from_path(self.root, path)
                if owner:
                    found.host_passwd[owner] = secret
                else:
                    found.passwd = secret
        else:
            text = self.check_pub(rel, data)
            if text is not None:
                found.keys.append(SshKey(rel, text, owner))

    def read_secret(self, rel: str, path: Path, *, check_mode: bool) -> bytes | None:
        """The bytes of a file in secrets/ (None: reported), warning when others may read it."""
        data = self.read_file(rel, path)
        if data is None:
            return None
        try:
            mode = path.stat().st_mode
        except OSError:  # gone since it was read: it was read, so use what was read
            mode = 0
        if check_mode and mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.warn(
                "secret-permissions",
                rel,
                0,
                f"readable by group/others (mode {stat.S_IMODE(mode):04o})",
                f"chmod 600 {rel}",
            )
        return data

    def check_token(self, rel: str, data: bytes, rule: str = "token-invalid") -> bool:
        text = data.decode("utf-8", errors="replace").strip()
        if not text or not text.isprintable() or any(c.isspace() for c in text):
            self.error(
                rule,
                rel,
                0,
                "the token must be one line of printable characters without spaces",
                "restore the token from your backup (`k3scluster init DIR` makes one "
                "only for a new cluster)"
                if rule == "token-invalid"
                else "delete it and run `k3scluster init DIR` for a new one (the next "
                "`pulumi up` gives it to the servers first, then to the agents)",
            )
            return False
        return True

    def check_passwd(self, rel: str, data: bytes) -> bool:
        text = data.decode("utf-8", errors="replace").strip()
        if "\n" in text or not _CRYPT.match(text):
            self.error(
                "passwd-invalid", rel, 0, "not a crypt password hash ($y$…, $6$…)", _PASSWD_HINT
            )
            return False
        return True

    def check_pub(self, rel: str, data: bytes) -> str | None:
        text = self.decode(rel, data)
        if text is None:
            return None
        if "PRIVATE KEY" in text:
            self.error(
                "ssh-key-invalid",
                rel,
                1,
                "is a PRIVATE key",
                "delete it from here and keep it safe; put its public half here "
                "(`ssh-keygen -y -f KEY > " + rel + "`)",
            )
            return None
        lines = []
        for i, line in enumerate(io.StringIO(text, newline=""), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not _valid_key_line(line):
                self.error(
                    "ssh-key-invalid",
                    rel,
                    i,
                    "not an ssh public key",
                    "use a line from ~/.ssh/id_ed25519.pub (ssh-ed25519 AAAA… comment)",
                )
                return None
            lines.append(line)
        if not lines:
            self.error(
                "ssh-key-invalid",
                rel,
                1,
                "holds no ssh public key",
                "put a key line (ssh-ed25519 AAAA… comment) into it or delete the file",
            )
            return None
        return "\n".join(lines)


def _valid_key_line(line: str) -> bool:
    """``TYPE BASE64 [comment]`` whose blob is a well-formed key of that type."""
    parts = line.split()
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        return False
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    fields = []
    pos = 0
    while pos < len(blob):  # the blob is a sequence of length-prefixed strings
        if pos + 4 > len(blob):
            return False
        n = int.from_bytes(blob[pos : pos + 4], "big")
        pos += 4
        if pos + n > len(blob):
            return False
        fields.append(blob[pos : pos + n])
        pos += n
    if len(fields) < 2 or fields[0] != parts[0].encode():
        return False
    return parts[0] != "ssh-ed25519" or (len(fields) == 2 and len(fields[1]) == 32)
