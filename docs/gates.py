"""Draw docs/gates.svg: armsproxy's gates, their ports and who connects to whom.

Hand-written SVG, no drawing library, so the picture can be regenerated anywhere:
``python docs/gates.py`` rewrites ``docs/gates.svg`` (a test checks the two agree). Arrows point
from the side that opens the connection, which is what a firewall rule needs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from xml.sax.saxutils import escape

OUT = Path(__file__).with_name("gates.svg")
WIDTH, HEIGHT = 1100, 580
FONT = "DejaVu Sans, Verdana, Arial, sans-serif"

# Colours: devices, armsproxy, operator systems.
SA_FILL, PROXY_FILL, GATE_FILL, RS_FILL = "#fdf2e3", "#eef3fb", "#ffffff", "#e9f6ec"
INK, GREY = "#1f2933", "#6b7785"


def _text(x: float, y: float, lines: list[str], *, size: int = 13, bold: bool = False,
          anchor: str = "middle", colour: str = INK) -> str:
    """Lines of text centred (by default) on x, the first baseline at y."""
    weight = ' font-weight="bold"' if bold else ""
    spans = "".join(
        f'<tspan x="{x}" dy="{0 if i == 0 else size + 3}">{escape(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    return (f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{colour}"{weight}>{spans}</text>')


def _box(x: float, y: float, w: float, h: float, title: str, lines: list[str], fill: str, *,
         title_size: int = 14, top: bool = False) -> str:
    """A rounded box with a bold title and smaller lines, centred (or at the top)."""
    rect = (f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" '
            f'stroke="{INK}" stroke-width="1.4"/>')
    if top:
        first = y + 24
    else:
        block = title_size + len(lines) * 15
        first = y + (h - block) / 2 + title_size - 2
    parts = [rect, _text(x + w / 2, first, [title], size=title_size, bold=True)]
    if lines:
        parts.append(_text(x + w / 2, first + 18, lines, size=12, colour=GREY))
    return "".join(parts)


def _arrow(x1: float, y1: float, x2: float, y2: float, above: list[str], below: list[str],
           *, dashed: bool = False, both: bool = False) -> str:
    """A horizontal arrow from the connecting side, labelled above and below."""
    dash = ' stroke-dasharray="7 5"' if dashed else ""
    start = ' marker-start="url(#tail)"' if both else ""
    line = (f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{INK}" stroke-width="2"'
            f'{dash}{start} marker-end="url(#head)"/>')
    mid = (x1 + x2) / 2
    parts = [line]
    if above:
        parts.append(_text(mid, y1 - 8 - 15 * (len(above) - 1), above, size=12))
    if below:
        parts.append(_text(mid, y1 + 19, below, size=12, colour=GREY))
    return "".join(parts)


def _inner(x1: float, y1: float, x2: float, y2: float) -> str:
    """A thin grey arrow between rooms inside armsproxy."""
    return (f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{GREY}" stroke-width="1.3" '
            f'marker-end="url(#small)"/>')


def svg() -> str:
    """The whole picture as SVG text (deterministic: the same bytes on every run)."""
    defs = (
        "<defs>"
        f'<marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
        f'markerHeight="9" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{INK}"/></marker>'
        f'<marker id="tail" viewBox="0 0 10 10" refX="1" refY="5" markerWidth="9" '
        f'markerHeight="9" orient="auto"><path d="M10,0 L0,5 L10,10 z" fill="{INK}"/></marker>'
        f'<marker id="small" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{GREY}"/></marker>'
        "</defs>"
    )
    body = [
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        _text(WIDTH / 2, 32, ["armsproxy: gates, ports and directions"], size=18, bold=True),
        _text(WIDTH / 2, 54, ["Arrows point from the side that opens the connection."],
              size=12, colour=GREY),
        # Devices.
        _box(20, 80, 190, 420, "SA devices",
             ["libarms, on the operator's", "network or behind NAT"], SA_FILL, top=True),
        _box(60, 330, 150, 60, "push port", ["https-simple listener"], GATE_FILL, title_size=13),
        # armsproxy and its rooms.
        _box(400, 80, 320, 420, "armsproxy", [], PROXY_FILL, title_size=16, top=True),
        _box(410, 115, 140, 78, "SA gate :443", ["HTTPS, ARMS XML", "Basic distid:key"],
             GATE_FILL, title_size=13),
        _box(570, 115, 140, 125, "RS client", ["pull relay", "SA key cache", "event outbox"],
             GATE_FILL, title_size=13),
        _box(410, 222, 140, 60, "store", ["SQLite, WAL"], GATE_FILL, title_size=13),
        _box(410, 318, 140, 78, "push engine", ["tunnel registry", "retries, deadlines"],
             GATE_FILL, title_size=13),
        _box(570, 318, 140, 78, "RS gate :8780", ["XML-RPC /RPC2", "or a unix socket"],
             GATE_FILL, title_size=13),
        _box(570, 420, 140, 62, "management :8781", ["HTTP, read-only"], GATE_FILL,
             title_size=12),
        _inner(550, 154, 570, 154),  # SA gate -> RS client: pulls relayed
        _inner(480, 193, 480, 222),  # SA gate -> store: done-requests committed
        _inner(590, 318, 550, 280),  # RS gate -> store: orders committed
        _inner(480, 282, 480, 318),  # store -> push engine: operations dispatched
        _inner(550, 230, 570, 230),  # store -> RS client: events delivered
        # Operator systems.
        _box(900, 80, 180, 330, "RS", ["the operator's backend:", "inventory, keys,",
                                       "configurations"], RS_FILL, top=True),
        _box(900, 430, 180, 70, "monitoring", ["Prometheus, probes"], RS_FILL, title_size=13),
        # Connections, from the side that opens them.
        _arrow(210, 135, 410, 135, ["HTTPS :443, TLS 1.2+", "(1.0 as opt-in)"],
               ["pulls, *-done requests"]),
        _arrow(210, 200, 410, 200, ["https-tunnel (SA dials in)"],
               ["pushes travel back over it"], dashed=True, both=True),
        _arrow(410, 360, 210, 360, ["HTTPS to the push port"],
               ["https-simple, pinned SA cert"]),
        _arrow(710, 140, 900, 140, ["XML-RPC to rs.url"], ["sa_key, config_solicitation,",
                                                          "push_method_query, ..."]),
        _arrow(710, 215, 900, 215, ["arms.event"], ["at least once, in order"]),
        _arrow(900, 357, 710, 357, ["XML-RPC to :8780"], ["push.*, sa.*"]),
        _arrow(900, 455, 710, 455, ["HTTP :8781"], ["/healthz /readyz /metrics"]),
        _text(WIDTH / 2, 538, ["The LS (not part of armsproxy) tells each SA to pull from "
                               "armsproxy's public URL, e.g. https://203.0.113.20/arms."],
              size=12, colour=GREY),
        _text(WIDTH / 2, 558, ["Production ports: SA gate 443 (and an optional tunnel_listen), "
                               "RS gate 8780 or /run/armsproxy/rs.sock, management 8781 on "
                               "loopback."], size=12, colour=GREY),
    ]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="{FONT}">\n'
        "<title>armsproxy: gates, ports and directions</title>\n"
        + defs + "\n" + "\n".join(body) + "\n</svg>\n"
    )


def main() -> int:
    OUT.write_text(svg(), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
