"""Where a stack renders and what it builds with: the one reading of those ``k3scluster:*`` keys.

Both readers of a stack's configuration use :func:`stack_layout`: the Pulumi program
(``__main__.py``, with a ``pulumi.Config``) and ``k3scluster build`` (with :class:`StackFile`,
which reads ``Pulumi.yaml`` and ``Pulumi.<stack>.yaml`` without Pulumi). So ``build`` renders
into the very directory, for the very kind of stack (VM or hardware), that ``pulumi up``
deploys from. Nothing here imports pulumi.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from k3scluster.errors import K3sClusterError

NAMESPACE = "k3scluster"


class ConfigReader(Protocol):
    """What :func:`stack_layout` asks of a configuration (``pulumi.Config`` has it)."""

    def get(self, key: str) -> str | None: ...

    def get_bool(self, key: str) -> bool | None: ...


@dataclass(frozen=True)
class StackLayout:
    """A stack's cluster directory, render directory, tools and kind."""

    stack: str
    cluster_dir: Path
    render_dir: Path
    colmena: str
    nix: str
    vms: bool
    # the stack file's texts for the two directories: what steps record (stackpaths.py)
    cluster_text: str = ""
    render_text: str = ""

    @property
    def recorded_as(self) -> tuple[tuple[Path, str], ...]:
        """(local directory, its text in the stack file) for ``Settings.recorded_as``."""
        roots = [(self.cluster_dir, self.cluster_text)] if self.cluster_text else []
        if self.render_text:
            roots.append((self.render_dir, self.render_text))
        return tuple(roots)

    @property
    def hive(self) -> Path:
        return self.render_dir / "hive.nix"

    @property
    def vm_stack(self) -> str | None:
        """The stack's name for a VM stack's render (its NICs named by its VMs' MACs)."""
        return self.stack if self.vms else None


def stack_layout(config: ConfigReader, stack: str, project_dir: Path) -> StackLayout:
    """``clusterDir`` (required) and ``renderDir`` relative to the project, the render
    directory by default ``<clusterDir>/.k3scluster/<stack>``; ``colmena``, ``nix``, ``vms``."""
    raw_dir = config.get("clusterDir")
    if not raw_dir:
        raise K3sClusterError(
            "the stack has no k3scluster:clusterDir",
            hint="pulumi config set k3scluster:clusterDir path/to/your/cluster",
        )
    raw_dir = raw_dir.strip()
    cluster_dir = (project_dir / Path(raw_dir).expanduser()).resolve()
    render_raw = (config.get("renderDir") or "").strip()
    render_dir = (
        (project_dir / Path(render_raw).expanduser()).resolve()
        if render_raw
        else cluster_dir / ".k3scluster" / stack
    )
    return StackLayout(
        stack=stack,
        cluster_dir=cluster_dir,
        render_dir=render_dir,
        colmena=config.get("colmena") or "colmena",
        nix=config.get("nix") or "nix",
        vms=bool(config.get_bool("vms")),
        cluster_text=raw_dir,
        render_text=render_raw,
    )


def project_path(project_dir: Path, raw: str | None) -> Path | None:
    """A file named in the stack config (``sshIdentity``, ``sshKnownHosts``,
    ``kubeconfigPath``): ``~`` expanded, relative to the project."""
    return (project_dir / Path(raw).expanduser()).resolve() if raw else None


def known_hosts_file(render_dir: Path, configured: Path | None, *, vms: bool = False) -> Path:
    """Where the project's ssh remembers host keys: ``sshKnownHosts``, else the stack's own
    ``<renderDir>-known_hosts`` (never ``~/.ssh/known_hosts``: a VM stack's keys for the
    plan's addresses would make ssh refuse the real machines).

    A VM stack (``vms``) always uses its own ``<renderDir>-vm-known_hosts``: it adds its
    VMs' keys for the plan's addresses and drops them again when a VM is deleted or installed
    again, which in a file shared with the real machines (a committed
    ``<cluster>/known_hosts``, ``~/.ssh/known_hosts``, the file of this same stack while it
    was a hardware stack) would replace and then delete the real hosts' keys, and a hardware
    stack would find the VMs' keys in it. Another file named is refused."""
    own = render_dir.parent / f"{render_dir.name}-{'vm-' if vms else ''}known_hosts"
    if vms and configured is not None and configured != own:
        raise K3sClusterError(
            f"k3scluster:sshKnownHosts is {configured}, but this is a VM stack "
            f"(k3scluster:vms): its VMs' host keys for the plan's addresses go to its own "
            f"{own} only, never to a file the real machines' keys may be in",
            hint="pulumi config rm k3scluster:sshKnownHosts (for this stack)",
        )
    return configured or own


def kubeconfig_file(render_dir: Path, configured: Path | None) -> Path:
    """Where ``up`` writes the kubeconfig: ``kubeconfigPath``, else ``<renderDir>/kubeconfig``."""
    return configured or render_dir / "kubeconfig"


def _plain(value: object) -> str | None:
    """A config value as Pulumi's ``Config.get`` returns it (YAML scalars as their text)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


class StackFile:
    """A stack's ``k3scluster:*`` configuration read from the project's files, without Pulumi:
    ``Pulumi.<stack>.yaml``'s ``config:``, else the defaults in ``Pulumi.yaml``'s ``config:``.

    Secret values (``secure:``) cannot be read here; asking for one is an error.
    """

    def __init__(self, project_dir: Path, stack: str) -> None:
        self.project_dir = project_dir
        self.stack = stack
        self.path = project_dir / f"Pulumi.{stack}.yaml"
        project = self._load(project_dir / "Pulumi.yaml", required=True)
        if project.get("name") != NAMESPACE:
            raise K3sClusterError(
                f"{project_dir / 'Pulumi.yaml'} is not the k3scluster project's",
                hint="run k3scluster build from the k3scluster checkout, or give --project",
            )
        declared = project.get("config")
        self._defaults = {
            k: v.get("default") if isinstance(v, Mapping) else v
            for k, v in (declared.items() if isinstance(declared, Mapping) else ())
        }
        if not self.path.is_file():
            raise K3sClusterError(
                f"stack {stack}: {self.path} does not exist",
                hint=f"pulumi stack select --create {stack}, then set k3scluster:clusterDir",
            )
        values = self._load(self.path).get("config")
        self._values: Mapping[str, object] = values if isinstance(values, Mapping) else {}

    @staticmethod
    def _load(path: Path, required: bool = False) -> dict[str, object]:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if required:
                raise K3sClusterError(
                    f"{path} does not exist",
                    hint="give the k3scluster project directory with --project",
                ) from None
            return {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exn:
            raise K3sClusterError(f"{path}: cannot be read: {exn}") from None
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> str | None:
        full = f"{NAMESPACE}:{key}"
        if full in self._values:
            value = self._values[full]
            if isinstance(value, Mapping) and "secure" in value:
                raise K3sClusterError(
                    f"{self.path}: {full} is a secret; k3scluster build cannot read it",
                    hint=f"set {full} in clear (it names a path or a program, never a secret)",
                )
            return _plain(value)
        return _plain(self._defaults.get(full))

    def get_bool(self, key: str) -> bool | None:
        value = self.get(key)
        if value is None:
            return None
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise K3sClusterError(
            f"{self.path}: {NAMESPACE}:{key} is {value!r}, not true or false",
            hint=f"pulumi config set {NAMESPACE}:{key} true",
        )
