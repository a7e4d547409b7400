"""A small, dependency-free HTML report writer (inline CSS, images by relative path).

Two layers:

- building blocks that return HTML strings, escaping every piece of text they are given:
  :func:`table`, :func:`image`, :func:`section`, :func:`key_values`, :func:`pre`,
  :func:`document`; :class:`Raw` marks markup that must not be escaped again;
- :func:`render_demo_report` / :func:`write_demo_report`: the demo's report, rendered
  from the content of its ``metrics.json`` (so a report can be re-rendered from that file
  alone).

Images are referenced by paths relative to the report's folder (the PNGs live beside it),
so the folder can be moved, zipped or served as it is. The page is readable in a browser
and when printed (tables and figures avoid page breaks; the navigation is hidden).

Example:
    >>> html = document("t", [section("Numbers", table(["a", "b"], [[1, 0.5]]), "n")])
    >>> "<table" in html and "0.500" in html
    True
"""

from __future__ import annotations

import html as _html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Raw",
    "document",
    "esc",
    "fmt",
    "image",
    "key_values",
    "pre",
    "render_demo_report",
    "section",
    "table",
    "write_demo_report",
    "write_html",
]


@dataclass(frozen=True)
class Raw:
    """Markup inserted as it is (already escaped or built by this module)."""

    html: str

    def __str__(self) -> str:
        return self.html


def esc(value: Any) -> str:
    """Text -> HTML (``Raw`` passes through)."""
    if isinstance(value, Raw):
        return value.html
    return _html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: floats with ``digits`` decimals, ``n/a`` for None/NaN, ints as
    they are, booleans as yes/no."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def _cell(value: Any, tag: str = "td", digits: int = 3) -> str:
    if isinstance(value, Raw):
        return f"<{tag}>{value.html}</{tag}>"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    cls = ' class="num"' if numeric else ""
    return f"<{tag}{cls}>{esc(fmt(value, digits))}</{tag}>"


def table(
    header: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    *,
    caption: str | None = None,
    row_classes: Sequence[str | None] | None = None,
    digits: int | Sequence[int] = 3,
) -> Raw:
    """An HTML table; numbers are formatted with :func:`fmt` and right-aligned.

    Args:
        header: column titles.
        rows: cells (text, numbers, ``None`` for n/a, or :class:`Raw` markup).
        caption: optional caption above the table.
        row_classes: optional CSS class per row (e.g. ``"total"``).
        digits: decimals of floats, for all columns or one per column.
    """
    rows = [list(r) for r in rows]
    classes = list(row_classes or [None] * len(rows))
    per_column = [digits] * len(header) if isinstance(digits, int) else list(digits)
    parts = ['<div class="table-wrap"><table>']
    if caption:
        parts.append(f"<caption>{esc(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(_cell(h, "th") for h in header) + "</tr></thead><tbody>")
    for row, cls in zip(rows, classes):
        attr = f' class="{esc(cls)}"' if cls else ""
        parts.append(f"<tr{attr}>" + "".join(_cell(c, digits=d) for c, d in zip(row, per_column)) + "</tr>")
    parts.append("</tbody></table></div>")
    return Raw("".join(parts))


def image(src: str | None, alt: str, *, caption: Any = None, width: str | None = None) -> Raw:
    """A figure with a relative ``src``; a visible note instead when ``src`` is ``None``."""
    if not src:
        return Raw(f'<p class="missing">{esc(alt)}: not available</p>')
    style = f' style="max-width:{esc(width)}"' if width else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption is not None else ""
    return Raw(f'<figure><a href="{esc(src)}"><img src="{esc(src)}" alt="{esc(alt)}"'
               f"{style}></a>{cap}</figure>")


def key_values(pairs: Iterable[tuple[Any, Any]]) -> Raw:
    """A two-column fact list."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v) if not isinstance(v, Raw) else v)}"
                   "</td></tr>" for k, v in pairs)
    return Raw(f'<table class="facts"><tbody>{rows}</tbody></table>')


def pre(text: str) -> Raw:
    """Preformatted text (commands, JSON)."""
    return Raw(f"<pre>{esc(text)}</pre>")


def section(title: str, body: Any, anchor: str, *, intro: str | None = None) -> Raw:
    """A titled section with an anchor for the navigation."""
    lead = f"<p>{esc(intro)}</p>" if intro else ""
    content = body if isinstance(body, Raw) else Raw(esc(body))
    return Raw(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{lead}{content.html}</section>')


def join(parts: Iterable[Any]) -> Raw:
    """Concatenate markup pieces (text is escaped)."""
    return Raw("".join(esc(p) for p in parts))


_CSS = """
:root { --ok: #1b7a2f; --bad: #b3261e; --na: #6b6b6b; --line: #d8d8d8; --soft: #f4f5f7; }
* { box-sizing: border-box; }
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d1d1f; margin: 0 auto; max-width: 1320px; padding: 0 24px 48px; }
header { border-bottom: 2px solid #1d1d1f; padding: 20px 0 10px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 30px 0 10px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; }
h3 { font-size: 16px; margin: 18px 0 6px; }
.sub { color: #555; margin: 0; }
nav { font-size: 13px; margin: 10px 0 0; }
nav a { margin-right: 12px; color: #0b57d0; text-decoration: none; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border: 1px solid var(--line); padding: 4px 8px; vertical-align: top; }
thead th { background: var(--soft); text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; background: #fafafa; }
table.facts th { text-align: left; background: var(--soft); font-weight: 600;
                 white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 170px;
        background: var(--soft); }
.card .v { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .k { font-size: 12px; color: #555; }
ul.bars { list-style: none; padding: 0; margin: 8px 0; }
ul.bars li { margin: 4px 0; padding: 6px 10px; border-left: 5px solid var(--na);
             background: var(--soft); }
ul.bars li.pass { border-color: var(--ok); }
ul.bars li.fail { border-color: var(--bad); }
.badge { display: inline-block; font-weight: 700; font-size: 12px; padding: 1px 7px;
         border-radius: 4px; color: #fff; background: var(--na); margin-right: 6px; }
.pass .badge, .badge.pass { background: var(--ok); }
.fail .badge, .badge.fail { background: var(--bad); }
.better { color: var(--ok); font-weight: 600; }
.worse { color: var(--bad); font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; }
.grid.wide { grid-template-columns: 1fr; }
figure { margin: 0 0 10px; break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); display: block; }
figcaption { font-size: 12px; color: #444; margin-top: 3px; }
pre { background: var(--soft); border: 1px solid var(--line); padding: 10px; font-size: 12px;
      overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
.missing, .note { color: #8a5a00; background: #fff7e0; padding: 6px 10px; border-radius: 4px; }
footer { margin-top: 40px; font-size: 12px; color: #666; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  nav { display: none; }
  a { color: inherit; text-decoration: none; }
  section, table, figure, ul.bars li { break-inside: avoid; }
  .grid { grid-template-columns: 1fr 1fr; }
  h2 { break-after: avoid; }
}
"""


def document(
    title: str,
    sections: Sequence[Raw],
    *,
    subtitle: str | None = None,
    nav: Sequence[tuple[str, str]] = (),
    footer: str | None = None,
) -> str:
    """A complete HTML page (UTF-8, inline CSS, no scripts)."""
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    head = (f"<header><h1>{esc(title)}</h1>"
            + (f'<p class="sub">{esc(subtitle)}</p>' if subtitle else "")
            + (f"<nav>{links}</nav>" if links else "") + "</header>")
    foot = f"<footer>{esc(footer)}</footer>" if footer else ""
    body = "".join(s.html for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
            f"<body>{head}<main>{body}</main>{foot}</body></html>\n")


def write_html(path: str | os.PathLike, text: str) -> Path:
    """Write the page atomically."""
    from medidiff.io import write_text_atomic

    return write_text_atomic(path, text)


# --------------------------------------------------------------------------------------------
# the demo report
# --------------------------------------------------------------------------------------------

_SECTIONS = (
    ("summary", "Summary"),
    ("kinds", "Per lesion kind"),
    ("scans", "Per scan"),
    ("how", "How it works"),
    ("synthesis", "Synthesis"),
    ("overlays", "Overlays"),
    ("models", "Models"),
    ("reproduce", "Reproduce"),
    ("run", "Run details"),
)


def _compare(value: float | None, ref: float | None) -> Raw:
    """``value`` marked better/worse than ``ref``."""
    text = esc(fmt(value))
    if value is None or ref is None:
        return Raw(text)
    cls = "better" if value > ref else "worse"
    return Raw(f'<span class="{cls}">{text}</span>')


def _verdict(passed: bool | None) -> tuple[str, str]:
    return {True: ("pass", "PASS"), False: ("fail", "FAIL"), None: ("na", "N/A")}[passed]


def _method_text(m: Mapping[str, Any]) -> str:
    name = m.get("method", "?")
    if name == "ensemble":
        return f"ensemble of t = {', '.join(str(t) for t in m.get('t_starts') or [])}"
    return (f"{name}: noise to t = {m.get('t_start')} with {m.get('noise')} noise, "
            f"{m.get('steps')} {m.get('sampler')} steps back")


def _summary(m: Mapping[str, Any]) -> Raw:
    data = m.get("data", {})
    kinds: dict[str, int] = {}
    for scan in data.get("test_scans", []):
        kinds[scan["kind"]] = kinds.get(scan["kind"], 0) + 1
    allrow = m["per_kind"]["all"]
    d, b = allrow["default"], allrow["baseline"]
    th = m["thresholds"]["default"]
    intro = (
        f"The default anomaly method ({_method_text(m['method'])}) of the 2D model was "
        f"calibrated on {len(data.get('calibration_scans', []))} healthy validation scans at a "
        f"{th['fpr']:.0%} false-positive rate (voxel threshold {th['voxel_threshold']:.4g}, "
        f"scan threshold {th['scan_threshold']:.4g}), then scored "
        f"{len(data.get('test_scans', []))} test scans ("
        + ", ".join(f"{n} {k}" for k, n in kinds.items())
        + "). Metrics are computed on each scan's own grid, inside its brain mask. The "
        "baseline uses no network: its reconstruction is the median healthy brain intensity, "
        "with the same post-processing and calibration."
    )
    cards = [
        ("voxel AUROC (default)", d["voxel_auroc"]),
        ("voxel AUROC (baseline)", b["voxel_auroc"]),
        ("voxel AUPRC (default)", d["voxel_auprc"]),
        ("voxel AUPRC (baseline)", b["voxel_auprc"]),
        (f"Dice at {th['fpr']:.0%} FPR (default)", d["dice_dataset_wise"]),
        ("scan AUROC (default)", d["scan_auroc"]),
        ("total time", f"{m.get('total_seconds', float('nan')):.0f} s"),
    ]
    card_html = "".join(
        f'<div class="card"><div class="v">{esc(fmt(v))}</div><div class="k">{esc(k)}</div></div>'
        for k, v in cards
    )
    bars = []
    for q in m.get("quality", []):
        cls, word = _verdict(q.get("passed"))
        bars.append(f'<li class="{cls}"><span class="badge">{word}</span>{esc(q["detail"])}</li>')
    n_pass = sum(q.get("passed") is True for q in m.get("quality", []))
    n_all = len(m.get("quality", []))
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in m.get("notes", []))
    budget = m.get("time_budget_s")
    total = m.get("total_seconds")
    timing = ""
    if budget and total:
        within = "within" if total <= budget else "OVER"
        machine = m.get("machine", {})
        limited = " (a limited run: --limit)" if data.get("limit") else ""
        timing = (f"<p>Wall time {total:.0f} s{esc(limited)}: {within} the {budget:.0f} s "
                  f"budget, on this machine ({machine.get('cpu_count')} CPUs, "
                  f"{machine.get('torch_threads')} torch threads, "
                  f"{m.get('workers', 1)} scoring worker(s), device "
                  f"{esc(machine.get('device'))}).</p>")
    body = (f"<p>{esc(intro)}</p><div class=\"cards\">{card_html}</div>"
            f"<h3>Quality bars: {n_pass} of {n_all} passed</h3><ul class=\"bars\">"
            + "".join(bars) + "</ul>" + timing + notes)
    return section("Summary", Raw(body), "summary")


def _kinds(m: Mapping[str, Any]) -> Raw:
    header = ["kind", "scans", "AUPRC default", "AUPRC baseline", "AUROC default",
              "AUROC baseline", "Dice default", "Dice baseline", "voxel FPR default",
              "voxel FPR baseline", "oracle Dice default", "AUPRC: better"]
    rows, classes = [], []
    for kind, row in m["per_kind"].items():
        d, b = row["default"], row["baseline"]
        winner: Any = "n/a"
        if d["voxel_auprc"] is not None and b["voxel_auprc"] is not None:
            winner = Raw('<span class="badge pass">default</span>' if d["voxel_auprc"] >
                         b["voxel_auprc"] else '<span class="badge fail">baseline</span>')
        rows.append([
            kind, d["n_scans"], _compare(d["voxel_auprc"], b["voxel_auprc"]), b["voxel_auprc"],
            _compare(d["voxel_auroc"], b["voxel_auroc"]), b["voxel_auroc"],
            d["dice_dataset_wise"], b["dice_dataset_wise"], d["voxel_fpr"], b["voxel_fpr"],
            d["oracle_dice"], winner,
        ])
        classes.append("total" if kind == "all" else None)
    intro = ("Voxel AUROC and AUPRC pool every voxel inside the brain masks of the scans of a "
             "kind; Dice is dataset-wise (TP, FP and FN summed over the scans) at the threshold "
             "calibrated on healthy scans; the voxel FPR is the share of normal voxels flagged "
             "(compare with the calibration target); the oracle Dice picks its threshold on the "
             "labels (an optimistic bound, not a deployable result). Healthy scans have no "
             "lesion, so only their FPR is defined.")
    return section("Per lesion kind: default method vs intensity baseline",
                   table(header, rows, row_classes=classes), "kinds", intro=intro)


def _scans(m: Mapping[str, Any]) -> Raw:
    header = ["scan", "kind", "lesion voxels", "score", "flagged", "voxels over threshold",
              "Dice", "Dice baseline", "score baseline", "network evaluations", "time (s)"]
    rows = []
    for s in m.get("scans", []):
        flag = Raw('<span class="badge fail">flagged</span>') if s["flagged"] else "no"
        rows.append([s["name"], s["kind"], s["lesion_voxels"], s["score"], flag,
                     s["voxels_over_threshold"], s["dice"], s["baseline_dice"],
                     s["baseline_score"], s["network_evaluations"], s["seconds"]])
    th = m["thresholds"]["default"]
    intro = (f"A scan is flagged when its score (mean of the top "
             f"{m['postprocess'].get('top_fraction', 0.01):.0%} of its voxel scores) exceeds "
             f"the scan threshold {th['scan_threshold']:.4g}. Dice is undefined (n/a) for a "
             "healthy scan: it has no lesion, and its voxels over threshold are all false "
             "positives. Voxel counts are on the scan's own grid.")
    digits = [3, 3, 0, 3, 3, 0, 3, 3, 3, 0, 1]
    return section("Per scan", table(header, rows, digits=digits), "scans", intro=intro)


def _overlays(m: Mapping[str, Any]) -> Raw:
    figs = []
    for s in m.get("scans", []):
        caption = (f"{s['name']} ({s['kind']}): score {fmt(s['score'], 4)}, Dice "
                   f"{fmt(s['dice'])}. Columns: input, reconstruction, anomaly map, "
                   "segmentation (red) and ground truth (green).")
        figs.append(image(s.get("files", {}).get("overlay"), f"overlay of {s['name']}",
                          caption=caption).html)
    intro = ("Axial slices on the model grid (neurological convention: the patient's right on "
             "the right).")
    return section("Overlays", Raw('<div class="grid">' + "".join(figs) + "</div>"), "overlays",
                   intro=intro)


def _synthesis(m: Mapping[str, Any]) -> Raw:
    parts = []
    labels = (("2d", "2D model: single axial slices"),
              ("3d", "3D model: whole volumes (middle axial slice shown)"))
    for key, label in labels:
        s = m.get("synthesis", {}).get(key)
        if not s:
            parts.append(f'<p class="missing">{esc(label)}: not run</p>')
            continue
        caption = (f"{label}; {s['num']} samples, {s['sampler']} {s['steps']} steps, "
                   f"shape {'x'.join(str(v) for v in s['shape'])}, {s['seconds']:.1f} s; "
                   f"files in {s['folder']}/")
        parts.append(f"<h3>{esc(label)}</h3>" + image(s.get("montage"), f"{key} montage",
                                                       caption=caption).html)
    return section("Synthesis", Raw("".join(parts)), "synthesis")


_FIGURE_TEXT = {
    "noising": "The forward process q(x_t | x_0): a brain slice noised at several t "
               "(x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps).",
    "reverse": "The learned reverse process: from pure noise to a sample (top: x_t, bottom: "
               "the predicted x_0).",
    "anomaly": "Partial diffusion on an anomaly case: input, noised x_t, reconstruction, "
               "residual, segmentation.",
}


def _how(m: Mapping[str, Any]) -> Raw:
    figs = m.get("figures") or {}
    if not figs:
        return section("How it works", Raw('<p class="missing">the strips were not drawn (see '
                                           "the notes in the summary)</p>"), "how")
    order = [k for k in ("noising", "reverse", "anomaly") if k in figs]
    order += [k for k in figs if k not in order]
    parts = [image(figs[k], k, caption=_FIGURE_TEXT.get(k, k)).html for k in order]
    return section("How it works", Raw('<div class="grid wide">' + "".join(parts) + "</div>"),
                   "how")


_CARD_KEYS = ("description", "config", "data", "network", "parameters", "steps", "batch_size",
              "wall_time_s", "machine", "final_loss", "trained_on", "sha256", "size_bytes")


def _models(m: Mapping[str, Any]) -> Raw:
    parts = []
    for key, label in (("2d", "2D model (anomaly detection, slice synthesis)"),
                       ("3d", "3D model (volume synthesis)")):
        info = m.get("models", {}).get(key)
        if not info:
            continue
        ck = info.get("checkpoint", {})
        card = info.get("card") or {}
        pairs: list[tuple[Any, Any]] = [("name", info.get("name")),
                                        ("shipped default", bool(info.get("shipped")))]
        for k in _CARD_KEYS:
            if k in card:
                v = card[k]
                pairs.append((k, v if isinstance(v, (str, int, float)) or v is None else
                              json.dumps(v, default=str)))
        for k in ("path", "sha256", "training_step", "spatial_dims", "preset", "parameters",
                  "grid_shape", "grid_spacing_mm", "noise", "schedule", "T", "prediction_type",
                  "written_by"):
            if k in ck and not (k == "sha256" and "sha256" in card):
                v = ck[k]
                pairs.append((f"checkpoint {k}" if k in ("path", "sha256") else k,
                              v if not isinstance(v, (list, tuple)) else
                              " x ".join(str(x) for x in v)))
        body = key_values(pairs).html
        if "metrics" in card:
            body += "<h3>card metrics</h3>" + pre(json.dumps(card["metrics"], indent=2,
                                                             default=str)).html
        if not card and info.get("shipped"):
            body += (f'<p class="note">no model card facts: medidiff/weights/{esc(info["name"])}'
                     ".json is missing from this installation</p>")
        elif not card:
            body += ('<p class="note">no model card: a user checkpoint, not a shipped '
                     "model</p>")
        parts.append(f"<h3>{esc(label)}</h3>{body}")
    return section("Models: the model cards' key facts", Raw("".join(parts)), "models")


def _reproduce(m: Mapping[str, Any]) -> Raw:
    return section("Reproduce", pre("\n".join(m.get("commands", []))), "reproduce",
                   intro="The exact commands (from the repository root, in the project's "
                   "virtual environment).")


def _run(m: Mapping[str, Any]) -> Raw:
    timings = m.get("timings", {})
    total = m.get("total_seconds") or sum(timings.values())
    rows = [[k, v, (100.0 * v / total if total else None)] for k, v in timings.items()]
    rows.append(["total", total, 100.0 if total else None])
    t = table(["stage", "seconds", "share (%)"], rows,
              row_classes=[None] * len(timings) + ["total"], digits=1)
    versions = key_values(sorted((m.get("versions") or {}).items()))
    machine = key_values((m.get("machine") or {}).items())
    return section("Run details", Raw(
        "<h3>Stage timings</h3>" + t.html + "<h3>Versions</h3>" + versions.html
        + "<h3>Machine</h3>" + machine.html), "run")


def render_demo_report(metrics: Mapping[str, Any]) -> str:
    """The demo's HTML page from the content of its ``metrics.json``.

    Args:
        metrics: the dict :func:`medidiff.cli.demo.run_demo` writes as ``metrics.json``
            (image paths in it are relative to the report's folder).

    Returns:
        The HTML text.
    """
    # the 16 overlays are the longest part: after the short sections, so that synthesis
    # and the how-it-works strips are not buried under them
    sections = [_summary(metrics), _kinds(metrics), _scans(metrics), _how(metrics),
                _synthesis(metrics), _overlays(metrics), _models(metrics), _reproduce(metrics),
                _run(metrics)]
    import medidiff

    subtitle = (f"sample_data, {metrics.get('created', '')}; medidiff {medidiff.__version__}. "
                "Synthetic data for software demonstration only, not for clinical use.")
    return document("medidiff demo report", sections, subtitle=subtitle, nav=_SECTIONS,
                    footer=f"metrics.json holds every number of this page; written by "
                           f"medidiff {medidiff.__version__}.")


def write_demo_report(metrics: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` (atomically) from the demo's metrics.

    Returns:
        The path written.
    """
    return write_html(Path(out_dir) / "report.html", render_demo_report(metrics))
