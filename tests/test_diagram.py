"""k3scluster.diagram: the picture (cluster.svg) and the tables (cluster.md) of a cluster.

The SVG is drawn by the real Graphviz ``dot`` (Debian graphviz, in scripts/setup) and read
back as XML. Golden files: tests/golden/diagram/ holds the DOT source and cluster.md of
examples/cluster (the SVG is not golden: it names graphviz's version and depends on its
layout); docs/cluster.svg is the picture the README shows. ``K3SCLUSTER_REGEN_GOLDEN=1
python -m pytest tests/test_diagram.py`` regenerates all three.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from k3scluster import diagram, plans
from k3scluster.cli import main
from k3scluster.installer import installer_inputs
from k3scluster.model import Cluster, K3sType
from k3scluster.render import host_inputs, render_files, render_to_dir

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "diagram"
DOCS_SVG = ROOT / "docs" / "cluster.svg"
REGEN = os.environ.get("K3SCLUSTER_REGEN_GOLDEN") == "1"
SVG_NS = "{http://www.w3.org/2000/svg}"
# what a plan's free-text column can hold: DOT and HTML-label syntax, escString sequences
# (\N is the node's name, \G the graph's), entities, Markdown syntax and a line break
HOSTILE = 'a"b <i>x</i> ]; } \\N \\G \\ &amp; &#9733; | `c` *d* _e_ [l](u) <br> ~s~ #h\nz'


def load(root: Path) -> Cluster:
    result = plans.load(root)
    assert result.cluster is not None, "\n".join(map(str, result.diagnostics))
    return result.cluster


@pytest.fixture
def cluster(example_src: Path) -> Cluster:
    return load(example_src)


def draw(cluster: Cluster) -> str:
    svg, why = diagram.draw_svg(diagram.dot_source(cluster))
    assert svg is not None, f"{why} (scripts/setup installs Debian graphviz)"
    return svg


# -- reading an SVG back --------------------------------------------------------


def _text(el: ET.Element) -> str:
    """The text of every <text> below ``el``, in order, as one string (Graphviz writes one
    <text> per run of one font, so a line can be several)."""
    joined = " ".join("".join(t.itertext()) for t in el.iter(f"{SVG_NS}text"))
    return " ".join(joined.split())  # one space for each run of spaces and no-break spaces


def groups(svg: str, cls: str) -> dict[str, ET.Element]:
    """<g class="node"> (or "cluster") elements by their <title>."""
    root = ET.fromstring(svg)
    found = {}
    for g in root.iter(f"{SVG_NS}g"):
        if g.get("class") == cls:
            title = g.find(f"{SVG_NS}title")
            assert title is not None and title.text is not None
            found[title.text] = g
    return found


def _numbers(el: ET.Element) -> list[tuple[float, float]]:
    """Every x,y point of the polygons and paths right below ``el``."""
    pts: list[tuple[float, float]] = []
    for shape in list(el):
        data = shape.get("points") or shape.get("d") or ""
        nums = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", data)]
        pts += list(zip(nums[::2], nums[1::2], strict=False))
    return pts


def box(el: ET.Element) -> tuple[float, float, float, float]:
    pts = _numbers(el)
    assert pts, ET.tostring(el)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def inside(inner: tuple[float, ...], outer: tuple[float, ...]) -> bool:
    return (
        outer[0] <= inner[0]
        and outer[1] <= inner[1]
        and inner[2] <= outer[2]
        and inner[3] <= outer[3]
    )


def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# -- the example's picture --------------------------------------------------------


def test_svg_shows_every_host_and_k3s_node(cluster: Cluster) -> None:
    svg = draw(cluster)
    nodes = groups(svg, "node")
    assert set(nodes) == {"gateway"} | {f"host {h.name}" for h in cluster.hosts}
    gateway = _text(nodes["gateway"])
    assert "10.0.100.1" in gateway and "10.0.100.0/24" in gateway and "8.8.8.8" in gateway
    for h in cluster.hosts:
        text = _text(nodes[f"host {h.name}"])
        for want in (h.name, str(h.ip), h.interface, h.admin, h.boot.value):
            assert want in text, (h.name, want, text)
        for k, v in h.columns:
            if k not in ("name", "interface", "ip", "admin", "boot"):
                assert v in text, (h.name, k, v)
        types = {n.type for n in cluster.k3s_on(h.name)}
        for n in cluster.k3s_on(h.name):
            for want in (n.name, str(n.ip), diagram.CONTAINER[n.role]):
                assert want in text, (h.name, n.name, want)
        assert (K3sType.INIT_SERVER in types) == ("init-server" in text), h.name
        assert (K3sType.SERVER in types) == ("server" in text.split()), h.name
        assert (K3sType.AGENT in types) == ("agent" in text.split()), h.name
    # every K3s node once, with its address; the API endpoint on the K3s frame
    everything = _text(ET.fromstring(svg))
    for n in cluster.k3s:
        assert everything.count(n.name) == 1 and str(n.ip) in everything
    assert "https://10.0.100.10:6443" in _text(groups(svg, "cluster")["cluster_k3s"])


def test_svg_marks_the_init_server(cluster: Cluster) -> None:
    svg = draw(cluster)
    init = cluster.init_server
    assert init is not None and init.host == "olaf"
    everything = _text(ET.fromstring(svg))
    assert everything.count("\u2605") == 1 and everything.count("init-server") == 1
    olaf = groups(svg, "node")["host olaf"]
    text = _text(olaf)
    # the star follows the init-server's name and address, in the cell filled for it
    assert re.search(r"olaf-k3s-server 10\.0\.100\.10 \u2605 init-server", text), text
    fills = [p.get("fill") for p in olaf.iter(f"{SVG_NS}polygon")]
    assert fills.count(diagram._INIT_FILL) == 1
    for name in ("host ulf", "host rolf", "host karl"):
        assert diagram._INIT_FILL not in {
            p.get("fill") for p in groups(svg, "node")[name].iter(f"{SVG_NS}polygon")
        }


def test_svg_draws_hosts_without_k3s_apart(cluster: Cluster) -> None:
    svg = draw(cluster)
    frames = groups(svg, "cluster")
    nodes = groups(svg, "node")
    assert set(frames) == {"cluster_k3s", "cluster_no_k3s"}
    assert _text(frames["cluster_no_k3s"]) == "hosts without K3s"
    assert "K3s cluster" in _text(frames["cluster_k3s"])
    k3s_frame, plain_frame = box(frames["cluster_k3s"]), box(frames["cluster_no_k3s"])
    assert not overlap(k3s_frame, plain_frame)
    for h in cluster.hosts:
        b = box(nodes[f"host {h.name}"])
        if cluster.k3s_on(h.name):
            assert inside(b, k3s_frame) and not overlap(b, plain_frame), h.name
        else:
            assert h.name == "ulrich"
            assert inside(b, plain_frame) and not overlap(b, k3s_frame), h.name
    assert not any(inside(box(nodes["gateway"]), f) for f in (k3s_frame, plain_frame))


def test_svg_boxes_do_not_overlap(cluster: Cluster) -> None:
    nodes = groups(draw(cluster), "node")
    boxes = sorted((name, box(g)) for name, g in nodes.items())
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not overlap(box_a, box_b), (a, b)


def test_one_edge_from_the_gateway_to_each_host_nic(cluster: Cluster) -> None:
    svg = draw(cluster)
    edges = groups(svg, "edge")
    nodes = groups(svg, "node")
    assert sorted(t.split(":")[0] for t in edges) == sorted(
        f"gateway->host {h.name}" for h in cluster.hosts
    )
    for title, edge in edges.items():
        host = nodes[title.split(":")[0].removeprefix("gateway->")]
        # the line ends at the host's NIC row: its left edge, level with the "NIC" text
        end_x, end_y = _numbers(edge)[-1]
        nic = next(t for t in host.iter(f"{SVG_NS}text") if t.text == "NIC ")
        assert abs(end_x - box(host)[0]) < 8, title
        assert abs(end_y - float(nic.get("y", "0"))) < 12, title


# -- golden files and the README's picture -------------------------------------------


def _compare(want: str, got: str, name: str) -> None:
    diff = "".join(
        difflib.unified_diff(
            want.splitlines(keepends=True), got.splitlines(keepends=True), name, "rendered"
        )
    )
    assert not diff, f"{name} is out of date (K3SCLUSTER_REGEN_GOLDEN=1 regenerates):\n{diff}"


@pytest.mark.parametrize("name", [diagram.DOT, diagram.MARKDOWN])
def test_golden_example(cluster: Cluster, name: str) -> None:
    got = diagram.sources(cluster)[name]
    path = GOLDEN / name
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(got, encoding="utf-8")
    _compare(path.read_text(encoding="utf-8"), got, f"tests/golden/diagram/{name}")


_VERSION = re.compile(r"<!-- Generated by graphviz version ([^\n]*)\n\s*-->\n")


def _graphviz_version(svg: str) -> str:
    m = _VERSION.search(svg)
    assert m, "no graphviz version comment in the SVG"
    return m.group(1).strip()


def _structure(svg: str) -> list[tuple[str, str, str]]:
    """Every SVG element's tag, title and text, without coordinates (layout differs between
    graphviz versions)."""
    return [
        (el.tag, el.get("class") or el.get("fill") or "", (el.text or "").strip())
        for el in ET.fromstring(svg).iter()
        if el.tag in (f"{SVG_NS}g", f"{SVG_NS}title", f"{SVG_NS}text", f"{SVG_NS}polygon")
    ]


def test_docs_picture_is_what_the_example_renders(cluster: Cluster) -> None:
    """docs/cluster.svg (shown in the README) is the example's picture as the code draws it."""
    got = draw(cluster)
    if REGEN:
        DOCS_SVG.write_text(got, encoding="utf-8")
    want = DOCS_SVG.read_text(encoding="utf-8")
    if _graphviz_version(want) == _graphviz_version(got):
        _compare(_VERSION.sub("", want), _VERSION.sub("", got), "docs/cluster.svg")
    else:  # another graphviz lays out differently: compare what is drawn, not where
        assert _structure(want) == _structure(got), (
            "docs/cluster.svg is out of date (K3SCLUSTER_REGEN_GOLDEN=1 regenerates)"
        )


def test_version_comment_is_what_the_docs_test_ignores(cluster: Cluster) -> None:
    # the comparison above strips exactly graphviz's version comment, nothing else
    svg = draw(cluster)
    stripped = _VERSION.sub("", svg)
    assert "graphviz version" not in stripped
    assert len(svg) - len(stripped) < 80
    assert stripped.count("<!--") == svg.count("<!--") - 1


# -- escaping -------------------------------------------------------------------------


def hostile_cluster(cluster: Cluster) -> Cluster:
    """The example with a hostile extra column (header and values) in both tables, and
    hostile host and K3s names (which check would refuse, but the model can hold)."""
    evil_host = 'ev"il\\ <h>'
    hosts = []
    for h in cluster.hosts:
        cols = dict(h.columns)
        cols["note|<x>"] = HOSTILE
        cols["ctl"] = "bell\x07esc\x1b"  # XML cannot hold these: they become U+FFFD
        if h.name == "ulrich":
            cols["name"] = evil_host
            h = dataclasses.replace(h, name=evil_host)
        hosts.append(dataclasses.replace(h, columns=tuple(cols.items())))
    k3s = []
    for n in cluster.k3s:
        cols = dict(n.columns)
        cols["tag"] = HOSTILE
        if n.name == "karl-k3s-agent":
            n = dataclasses.replace(n, name='ag"ent\\N')
            cols["name"] = n.name
        k3s.append(dataclasses.replace(n, columns=tuple(cols.items())))
    return dataclasses.replace(
        cluster,
        hosts=tuple(hosts),
        k3s=tuple(k3s),
        host_columns=(*cluster.host_columns, "note|<x>", "ctl"),
        k3s_columns=(*cluster.k3s_columns, "tag"),
    )


def test_hostile_values_come_out_literal_in_the_svg(cluster: Cluster) -> None:
    evil = hostile_cluster(cluster)
    svg = draw(evil)  # well-formed XML, or ET.fromstring fails below
    flat = HOSTILE.replace("\n", " ")
    nodes = groups(svg, "node")
    # a node's ID (its <title>) keeps the doubled backslash of dot_id; every host has its own
    titles = {h.name: "host " + h.name.replace("\\", "\\\\") for h in evil.hosts}
    assert set(nodes) == {"gateway", *titles.values()}
    for h in evil.hosts:
        text = _text(nodes[titles[h.name]])
        assert h.name in text
        assert f"note|<x> {flat}" in text, text
        assert "ctl bell\ufffdesc\ufffd" in text, text
        for n in evil.k3s_on(h.name):
            assert n.name in text
            assert text.count(flat) == 1 + 1 * len(evil.k3s_on(h.name))
    assert 'ag"ent\\N' in _text(nodes["host karl"])
    assert 'ev"il\\ <h>' in _text(nodes['host ev"il\\\\ <h>'])


def test_dot_id_and_html_escaping() -> None:
    assert diagram.html('<a href="x">&\\N') == "&lt;a href=&quot;x&quot;&gt;&amp;\\\\N"
    assert diagram.html("a\nb\tc\x00d\x7f") == "a b c\ufffdd\ufffd"
    assert diagram.dot_id('a"b\\') == '"a\\"b\\\\"'


def test_hostile_values_come_out_literal_in_the_markdown(cluster: Cluster) -> None:
    evil = hostile_cluster(cluster)
    html = MarkdownIt("commonmark").enable("table").render(diagram.markdown(evil))
    cells = [_unescape_html(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", html, flags=re.DOTALL)]
    flat = HOSTILE.replace("\n", " ")
    # every row's hostile value is one cell, unformatted (no <i>, <code>, <em>, <a>)
    assert cells.count(flat) == len(evil.hosts) + len(evil.k3s)
    assert cells.count("bell\ufffdesc\ufffd") == len(evil.hosts)
    assert "note|<x>" in cells and 'ev"il\\ <h>' in cells and 'ag"ent\\N' in cells
    tables = "".join(re.findall(r"<table>.*?</table>", html, flags=re.DOTALL))
    for tag in ("<i>", "<code>", "<em>", "<a ", "<br>", "<del>", "<s>", "<h1>"):
        assert tag not in tables
    # the tables have as many cells in every row as in their header
    for table in re.findall(r"<table>(.*?)</table>", html, flags=re.DOTALL):
        widths = {
            len(re.findall(r"<t[dh]>", row))
            for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.DOTALL)
        }
        assert len(widths) == 1, table


def _unescape_html(text: str) -> str:
    import html

    return html.unescape(text)


# -- what k3scluster render writes ---------------------------------------------------


def test_render_writes_the_svg_and_the_markdown(
    example_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = example_dir / "out"
    assert main(["render", str(example_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "notice" not in captured.err
    svg = (out / diagram.SVG).read_text(encoding="utf-8")
    assert "host olaf" in groups(svg, "node")
    md = (out / diagram.MARKDOWN).read_text(encoding="utf-8")
    assert md == diagram.markdown(load(example_dir)) and "![the cluster](cluster.svg)" in md
    assert not (out / diagram.DOT).exists()
    assert f"wrote    {diagram.SVG}" in captured.out


def test_render_without_dot_writes_the_dot_source_and_says_how(
    example_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = tmp_path / "no-graphviz"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = example_dir / "out"
    assert main(["render", str(example_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "notice" in line]
    assert len(notices) == 1, err
    assert "`dot` was not found" in notices[0]
    assert f"dot -Tsvg {out}/cluster.dot -o {out}/cluster.svg" in notices[0]
    assert "apt-get install graphviz" in notices[0]
    c = load(example_dir)
    assert (out / diagram.DOT).read_text(encoding="utf-8") == diagram.dot_source(c)
    assert not (out / diagram.SVG).exists()
    md = (out / diagram.MARKDOWN).read_text(encoding="utf-8")
    assert "![the cluster]" not in md and "dot -Tsvg cluster.dot -o cluster.svg" in md
    # the NixOS configuration is all there
    assert set(render_files(c, out)) <= {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
    }
    # and the notice's command draws the picture from what was written
    monkeypatch.undo()
    subprocess.run(
        ["dot", "-Tsvg", str(out / diagram.DOT), "-o", str(out / diagram.SVG)], check=True
    )
    assert "host olaf" in groups((out / diagram.SVG).read_text(encoding="utf-8"), "node")


def test_a_failing_dot_is_a_notice_with_its_error() -> None:
    svg, why = diagram.draw_svg("digraph { this is not dot ")
    assert svg is None and why is not None
    assert why.startswith("Graphviz `dot` failed:") and "syntax error" in why


def test_the_picture_is_no_input_of_any_host(cluster: Cluster, tmp_path: Path) -> None:
    """host_inputs and installer_inputs read render_files, which holds no picture (see also
    test_components.py::test_a_changed_picture_redeploys_no_host)."""
    out = tmp_path / "out"
    written = render_to_dir(cluster, out)
    assert {diagram.SVG, diagram.MARKDOWN} <= set(written)
    files = render_files(cluster, out)
    assert not set(diagram.PICTURE_FILES) & set(files)
    for h in cluster.hosts:
        names = set(host_inputs(cluster, h.name, files)) | set(installer_inputs(files, h.name))
        assert not any(p in k for k in names for p in diagram.PICTURE_FILES), h.name
