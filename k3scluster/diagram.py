"""A picture of the cluster: Graphviz DOT source and a Markdown summary, from the model.

``dot_source`` and ``markdown`` are pure functions of a loaded ``Cluster``; ``draw_svg``
runs Graphviz's ``dot`` (an argv list, the DOT source on stdin). ``picture_files`` puts them
together for ``k3scluster render``: ``cluster.md`` always, ``cluster.svg`` when ``dot`` can
draw it, else ``cluster.dot`` and a one-line notice saying how to draw it. Nothing here
imports pulumi.

These files are for people. No host's deploy digest and no installer image depends on
them (``render.host_inputs`` and ``installer.installer_inputs`` read ``render_files``,
which does not hold them).

Every value from the plans passes ``html`` (Graphviz HTML-like labels, the only way user
text enters the DOT source) or ``md_cell`` (Markdown table cells).
"""

from __future__ import annotations

import shutil
import subprocess
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from k3scluster.model import Cluster, Host, K3sNode, K3sType
from k3scluster.pins import k3s_package_attr

SVG = "cluster.svg"
DOT = "cluster.dot"
MARKDOWN = "cluster.md"
PICTURE_FILES = (SVG, DOT, MARKDOWN)

# hosts.csv / k3s.csv columns the picture shows in their own place; the others ("extra
# columns") are listed in the host's box
_HOST_SHOWN = ("name", "interface", "ip", "admin", "disk", "boot")
_K3S_SHOWN = ("host", "name", "type", "ip")

# the containers render.py makes for a K3s row (see docs/DESIGN.md, "Names")
CONTAINER = {"server": "k3s-server", "agent": "k3s-agent"}
CONTAINER_KIND = {"server": "NixOS container", "agent": "podman container"}

FONT = "Helvetica,Arial,sans-serif"
_HOST_COLOR = "#3b6ea5"
_INIT_FILL = "#ffd166"
_SERVER_FILL = "#dce9f7"
_AGENT_FILL = "#e3f4e1"
_GREY = "#555555"
DOT_TIMEOUT_S = 120


# -- escaping ----------------------------------------------------------------


def _printable(text: str) -> str:
    """Line breaks and tabs become spaces; other control characters, lone surrogates and
    U+FFFE/U+FFFF become U+FFFD (SVG is XML, which cannot hold them; a Markdown table cell
    ends at a line break)."""
    out = []
    for ch in str(text):
        if ch in "\t\n\r\v\f":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch in "\ufffe\uffff":
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def html(text: object) -> str:
    """``text`` as literal text inside a Graphviz HTML-like label (``label=<…>``).

    ``&``, ``<``, ``>`` and ``"`` become entities. Graphviz still expands escString
    sequences such as ``\\N`` (the node's name) in HTML labels, after decoding entities, so
    a backslash is doubled (``\\\\`` is one literal backslash there; ``&#92;`` would not do).
    """
    s = _printable(str(text))
    return (
        s.replace("\\", "\\\\")
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
    )


def dot_id(text: object) -> str:
    """``text`` as a quoted DOT ID: ``\\`` and ``"`` backslash-escaped, so no value can end the
    string (DOT turns only ``\\"`` back into ``"``; a doubled backslash stays two, which
    keeps IDs distinct)."""
    s = _printable(str(text)).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


_MD_SPECIAL = set("\\`*_[]<>|~&#!")


def md_cell(text: object) -> str:
    """``text`` as literal text inside a Markdown (GitHub) table cell.

    A backslash before every character that could format, link, end the cell (``|``) or
    start an HTML tag or entity; CommonMark lets any ASCII punctuation be escaped so.
    An empty value becomes an empty cell.
    """
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in _printable(str(text)))


# -- DOT ---------------------------------------------------------------------


def _extra_columns(
    columns: Sequence[tuple[str, str]], shown: Sequence[str]
) -> list[tuple[str, str]]:
    """The row's columns the picture has no place of its own for, escaped, non-empty only."""
    return [(html(k), html(v)) for k, v in columns if k not in shown and v != ""]


def _details(pairs: Sequence[tuple[str, str]]) -> str:
    """Small left-aligned lines ``key value``, the key grey (both already escaped)."""
    return "".join(
        f'<FONT POINT-SIZE="10"><FONT COLOR="{_GREY}">{k}</FONT> {v}</FONT><BR ALIGN="LEFT"/>'
        for k, v in pairs
    )


def _container_cell(node: K3sNode) -> str:
    role = node.role
    if node.type is K3sType.INIT_SERVER:
        fill, badge = _INIT_FILL, "<B>&#9733; init-server</B>"
    else:
        fill, badge = (_SERVER_FILL if role == "server" else _AGENT_FILL), html(node.type.value)
    details = [(html(CONTAINER_KIND[role]), html(CONTAINER[role]))]
    details += _extra_columns(node.columns, _K3S_SHOWN)
    return (
        f'<TD BGCOLOR="{fill}" ALIGN="LEFT" BALIGN="LEFT" VALIGN="TOP" PORT="{role}">'
        f'<B>{html(node.name)}</B><BR ALIGN="LEFT"/>'
        f'{html(node.ip)}<BR ALIGN="LEFT"/>'
        f'{badge}<BR ALIGN="LEFT"/>'
        f"{_details(details)}</TD>"
    )


def _host_label(host: Host, nodes: Sequence[K3sNode]) -> str:
    details = [("boot", html(host.boot.value))]
    if host.disk:
        details.append(("disk", html(host.column_map.get("disk", host.disk))))
    details.append(("admin", html(host.admin)))
    details += _extra_columns(host.columns, _HOST_SHOWN)
    width = max(1, len(nodes))
    span = f'COLSPAN="{width}" ALIGN="LEFT"'
    rows = [
        f'<TR><TD {span} BGCOLOR="{_HOST_COLOR}"><FONT COLOR="white">'
        + f"<B>{html(host.name)}</B></FONT></TD></TR>",
        f'<TR><TD {span} PORT="nic">NIC <B>{html(host.interface)}</B>'
        + f"   {html(host.ip)}</TD></TR>",
        f'<TR><TD {span} BALIGN="LEFT">{_details(details)}</TD></TR>',
    ]
    if nodes:
        cells = "".join(f"\n      {_container_cell(n)}" for n in nodes)
        rows.append(f"<TR>{cells}\n    </TR>")
    # one row a line, each container cell a line (Graphviz ignores white space between tags)
    return (
        f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="4" CELLPADDING="4" '
        f'COLOR="{_HOST_COLOR}" BGCOLOR="white">'
        + "".join(f"\n    {r}" for r in rows)
        + "\n    </TABLE>>"
    )


def _gateway_label(cluster: Cluster) -> str:
    net = cluster.network
    rows = [
        ("gateway", f"<B>{html(net.gateway)}</B>"),
        ("subnet", html(net.network)),
        ("nameservers", ", ".join(html(n) for n in net.nameservers)),
    ]
    return (
        '<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="2" CELLPADDING="3" COLOR="#333333">'
        + "".join(
            f'\n    <TR><TD ALIGN="LEFT"><FONT COLOR="{_GREY}">{k}</FONT></TD>'
            f'<TD ALIGN="LEFT">{v}</TD></TR>'
            for k, v in rows
        )
        + "\n    </TABLE>>"
    )


def _nodes_by_host(cluster: Cluster) -> dict[str, list[K3sNode]]:
    by_host: dict[str, list[K3sNode]] = {}
    for node in cluster.k3s:
        by_host.setdefault(node.host, []).append(node)
    for nodes in by_host.values():
        nodes.sort(key=lambda n: 0 if n.type.is_server else 1)  # server left of agent
    return by_host


def _title(cluster: Cluster) -> str:
    net = cluster.network
    n_hosts, n_k3s = len(cluster.hosts), len(cluster.k3s)
    parts = [
        f"{n_hosts} host{'s' if n_hosts != 1 else ''}",
        f"{n_k3s} K3s node{'s' if n_k3s != 1 else ''}",
        f"NixOS {html(net.nixos_release)}",
    ]
    if cluster.k3s:
        parts.append(f"K3s {html(net.k3s)}")
    return "k3scluster: " + " · ".join(parts)


def dot_source(cluster: Cluster) -> str:
    """The Graphviz DOT source of the cluster's picture.

    Left the gateway (and the subnet); right one box per host (name, NIC and IP, boot,
    disk, admin, extra columns) holding its K3s containers (node name, IP, type; the
    init-server starred and filled); the hosts that run K3s in one frame with the API
    endpoint, the hosts without K3s in another. A host's node ID is ``host <name>`` (the
    ``<title>`` of its group in the SVG).
    """
    by_host = _nodes_by_host(cluster)
    ids = {h.name: dot_id(f"host {h.name}") for h in cluster.hosts}
    k3s_hosts = [h for h in cluster.hosts if by_host.get(h.name)]
    plain_hosts = [h for h in cluster.hosts if not by_host.get(h.name)]
    lines = [
        "digraph k3scluster {",
        f'  graph [rankdir=LR, fontname="{FONT}", fontsize=14, labelloc=t, labeljust=l,',
        "         nodesep=0.3, ranksep=1.0, newrank=true, pad=0.2,",
        f"         label=<<B>{_title(cluster)}</B>>];",
        f'  node [shape=plain, fontname="{FONT}", fontsize=11];',
        '  edge [arrowhead=none, color="#777777", penwidth=1.2];',
        f"  gateway [label={_gateway_label(cluster)}];",
    ]

    def frame(name: str, label: str, style: str, hosts: Iterable[Host]) -> None:
        lines.append(f"  subgraph {name} {{")
        lines.append(
            f'    graph [label=<{label}>, style="{style}", color="#999999", '
            f"fontsize=12, labeljust=l, margin=12];"
        )
        for h in hosts:
            lines.append(f"    {ids[h.name]} [label={_host_label(h, by_host.get(h.name, []))}];")
        lines.append("  }")

    if k3s_hosts:
        api = cluster.api_endpoint
        label = "<B>K3s cluster</B>" + (f"  API {html(api)}" if api else "")
        frame("cluster_k3s", label, "rounded", k3s_hosts)
    if plain_hosts:
        frame("cluster_no_k3s", "<B>hosts without K3s</B>", "dashed,rounded", plain_hosts)
    for h in cluster.hosts:
        lines.append(f"  gateway -> {ids[h.name]}:nic:w;")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- Markdown ----------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(md_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _roles(nodes: Sequence[K3sNode]) -> str:
    return ", ".join(n.type.value for n in nodes) if nodes else "none"


def markdown(cluster: Cluster, picture: str | None = SVG) -> str:
    """``cluster.md``: the network, the hosts and the K3s nodes as tables.

    ``picture`` is the file name of the drawn picture beside it (linked at the top), or
    None when it could not be drawn.
    """
    net = cluster.network
    by_host = _nodes_by_host(cluster)
    init = cluster.init_server
    lines = [
        "# The cluster",
        "",
        "Made by `k3scluster render` from `plans/`; edit the plans, not this file.",
        "",
    ]
    if picture:
        lines += [f"![the cluster]({picture})", ""]
    else:
        lines += [
            f"The picture was not drawn (Graphviz `dot` was missing); `{DOT}` beside this file",
            f"is its source: `dot -Tsvg {DOT} -o {SVG}`.",
            "",
        ]
    network_rows = [
        ("gateway", str(net.gateway)),
        ("subnet", str(net.network)),
        ("nameservers", ", ".join(str(n) for n in net.nameservers)),
        ("NixOS", net.nixos_release),
    ]
    if cluster.k3s:
        network_rows.append(("K3s", f"{net.k3s} (pkgs.{k3s_package_attr(net.k3s)})"))
    if init is not None and cluster.api_endpoint:
        network_rows.append(
            ("K3s API", f"{cluster.api_endpoint} (init-server {init.name} on {init.host})")
        )
    lines += ["## Network", ""]
    lines += _table(("setting", "value"), network_rows)

    columns = list(cluster.host_columns) or list(_HOST_SHOWN[:4])
    lines += ["", "## Hosts", ""]
    lines += _table(
        [*columns, "K3s"],
        (
            [h.column_map.get(c, "") for c in columns] + [_roles(by_host.get(h.name, []))]
            for h in cluster.hosts
        ),
    )

    if cluster.k3s:
        kcols = list(cluster.k3s_columns) or list(_K3S_SHOWN)
        lines += ["", "## K3s nodes", ""]
        lines += _table(
            [*kcols, "container"],
            (
                [n.column_map.get(c, "") for c in kcols]
                + [f"{CONTAINER[n.role]} ({CONTAINER_KIND[n.role]})"]
                for n in cluster.k3s
            ),
        )
    plain = [h.name for h in cluster.hosts if not by_host.get(h.name)]
    if plain:
        lines += ["", "Hosts without K3s: " + ", ".join(md_cell(p) for p in plain) + "."]
    return "\n".join(lines) + "\n"


# -- drawing -----------------------------------------------------------------


def draw_svg(
    source: str, dot: str = "dot", timeout: float = DOT_TIMEOUT_S
) -> tuple[str | None, str | None]:
    """Run ``dot -Tsvg`` on ``source``: (the SVG, None), or (None, why it could not)."""
    exe = shutil.which(dot)
    if exe is None:
        return None, f"Graphviz `{dot}` was not found on PATH"
    try:
        proc = subprocess.run(
            [exe, "-Tsvg"],
            input=source.encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"Graphviz `{dot}` took longer than {timeout:g} s"
    except OSError as exc:
        return None, f"Graphviz `{dot}` could not run ({exc.strerror or exc})"
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        first = err[0] if err else f"exit status {proc.returncode}"
        return None, f"Graphviz `{dot}` failed: {first}"
    return proc.stdout.decode("utf-8", "replace"), None


def sources(cluster: Cluster) -> dict[str, str]:
    """What decides the picture's files (pure): the DOT source and the Markdown. The Pulumi
    render step counts their digests, so that a changed picture re-renders; no host does."""
    return {DOT: dot_source(cluster), MARKDOWN: markdown(cluster, SVG)}


def picture_files(
    cluster: Cluster, out: Path | None = None, dot: str = "dot"
) -> tuple[dict[str, str], str | None]:
    """The picture's files for the render output, and a one-line notice when the SVG could
    not be drawn (then ``cluster.dot`` is written instead, and the notice says how to draw it
    from that; rendering goes on)."""
    source = dot_source(cluster)
    svg, why = draw_svg(source, dot)
    if svg is not None:
        return {SVG: svg, MARKDOWN: markdown(cluster, SVG)}, None
    where = f"{out}/" if out is not None else ""
    notice = (
        f"notice: {why}: wrote {DOT} instead of {SVG} (the NixOS configuration is complete); "
        f"to draw it, install Graphviz (Debian: apt-get install graphviz) and run "
        f"`dot -Tsvg {where}{DOT} -o {where}{SVG}`"
    )
    return {DOT: source, MARKDOWN: markdown(cluster, None)}, notice
