"""The dashboard's charts: the counters' last hour as small inline SVG, drawn on the
server (no chart library, no script needed to see them)."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

__all__ = ["LABELS", "render_all", "svg"]

LABELS = {"received": "Received", "delivered": "Delivered", "deferred": "Deferred",
          "bounced": "Bounced", "relay_refusals": "Relay refusals"}
WIDTH, HEIGHT, PAD = 300, 72, 2


def svg(name: str, values: list[float | None]) -> Markup:
    """A bar per minute; minutes before the server started are left empty."""
    label = LABELS[name]
    known = [v for v in values if v is not None]
    total = int(sum(known))
    peak = max(known, default=0) or 1
    n = len(values)
    bar = (WIDTH - 2 * PAD) / n
    parts = []
    for i, v in enumerate(values):
        if not v:
            continue
        h = max(1.0, (HEIGHT - 2 * PAD) * v / peak)
        parts.append(f'<rect x="{PAD + i * bar:.1f}" y="{HEIGHT - PAD - h:.1f}" '
                     f'width="{max(bar - 1, 1):.1f}" height="{h:.1f}"><title>'
                     f'{n - 1 - i} min ago: {int(v)}</title></rect>')
    last = int(values[-1] or 0)
    summary = f"{label}: {total} in the last hour, {last} this minute, at most {int(peak)} a minute"
    return Markup(
        f'<svg class="chart chart-{escape(name)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'preserveAspectRatio="none" role="img" aria-label="{escape(summary)}">'
        f'<line class="axis" x1="0" y1="{HEIGHT - PAD}" x2="{WIDTH}" y2="{HEIGHT - PAD}"/>'
        + "".join(parts) + "</svg>")


def render_all(history: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, values in history["series"].items():
        known = [v for v in values if v is not None]
        out.append({"name": name, "label": LABELS.get(name, name), "svg": svg(name, values),
                    "hour": int(sum(known)), "total": int(history["totals"].get(name, 0))})
    return out
