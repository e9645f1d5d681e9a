"""The evaluation report: one self-contained HTML page (its figures embedded) plus the PNGs.

The page holds the aggregate table beside the paper's HDTF and CREMA figures, a table per item,
for each item its lip-opening curves (reference, structure frames, output: the paper's Fig. 7),
its noise-pattern heat maps before and after the filter and a frame strip (identity | lip
reference | structure frame | generated | filtered), and which models ran. Where any model is a
tiny random-weight stand-in, the page says so in large letters and every table repeats it.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from freetalk_core.evaluation.metrics import HIGHER_IS_BETTER, PAPER_RESULTS

STRIP_PANELS = ("identity", "lip reference", "structure frame", "generated", "filtered")
STRIP_SIZE = 192
TINY_WARNING = ("TINY RANDOM-WEIGHT MODELS: these outputs are noise by design and the metrics "
                "below measure nothing about quality")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def lip_curve_plot(curves: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """Lip opening per frame of each named sequence (NaN: no face found) in one plot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3))
    for name, curve in curves.items():
        ax.plot(np.asarray(curve, dtype=np.float64), label=name, lw=1.2)
    ax.set_xlabel("frame")
    ax.set_ylabel("lip opening / inter-ocular")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def noise_pattern_figure(before: np.ndarray | None, after: np.ndarray | None, path: Path) -> Path:
    """Heat maps of the noise pattern before and after the filter, on one colour scale."""
    plt = _pyplot()
    shown = [(name, p) for name, p in (("before the filter", before), ("after the filter", after)) if p is not None]
    values = np.concatenate([np.asarray(p)[np.asarray(p) > 0] for _, p in shown]) if shown else np.zeros(0)
    top = float(np.percentile(values, 99)) if values.size else 1.0
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4), squeeze=False)
    for ax, (name, pattern) in zip(axes[0], shown):
        image = ax.imshow(pattern, cmap="inferno", vmin=0, vmax=top or 1.0)
        ax.set_title(f"noise pattern {name}", fontsize=9)
        ax.axis("off")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    return _save(fig, path)


def frame_strip(rows: list[list[np.ndarray]], path: Path, size: int = STRIP_SIZE) -> Path:
    """Rows of the panels `STRIP_PANELS` (RGB uint8 crops), labelled, as one PNG."""
    import cv2

    def panel(image, label):
        image = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_AREA)
        cv2.putText(image, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(image, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        return image

    strip = np.concatenate([np.concatenate([panel(im, name) for im, name in zip(row, STRIP_PANELS)], axis=1)
                            for row in rows], axis=0) if rows else np.zeros((size, size, 3), np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    return path


def _format(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    return f"{value:.4g}"


def metric_order(names) -> list[str]:
    """Table 2's metrics first, then the structure frames', then anything else."""
    base = list(HIGHER_IS_BETTER)
    structure = [f"structure_{k}" for k in ("PD", "CSLD", "PCLD")]
    known = [n for n in base + structure if n in names]
    return known + sorted(n for n in names if n not in known)


def _direction(name: str) -> str:
    higher = HIGHER_IS_BETTER.get(name.removeprefix("structure_"))
    return "" if higher is None else (" &uarr;" if higher else " &darr;")


def _table(header: list[str], rows: list[list[str]], caption: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def aggregate_rows(aggregate: dict[str, float]) -> list[list[str]]:
    """`[metric, this run, HDTF, CREMA]` per metric (formatted values)."""
    return [[f"{name}{_direction(name)}", _format(aggregate.get(name)),
             _format(PAPER_RESULTS["HDTF"].get(name)), _format(PAPER_RESULTS["CREMA"].get(name))]
            for name in metric_order(aggregate)]


def markdown_summary(aggregate: dict[str, float], n_items: int, tiny: bool) -> str:
    """The aggregate as a markdown table beside the paper's figures (a Prefect artifact)."""
    lines = [f"**{TINY_WARNING}**", ""] if tiny else []
    lines += [f"Evaluation of {n_items} item(s)", "", "| metric | this run | paper HDTF | paper CREMA |",
              "| --- | --- | --- | --- |"]
    for row in aggregate_rows(aggregate):
        lines.append("| " + " | ".join(c.replace("&ndash;", "-").replace("&uarr;", "(higher better)")
                                       .replace("&darr;", "(lower better)") for c in row) + " |")
    return "\n".join(lines)


def _image(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: top; font-weight: bold; color: #b00; text-align: left; }
.tiny { background: #b00; color: #fff; font-size: 2.2em; font-weight: bold; padding: 0.6em; }
.notes { color: #555; font-size: 0.9em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


def _size_label(model: dict) -> str:
    if model["full_size"] is None:
        return "not checkable" if model["path"] and Path(model["path"]).exists() else "absent"
    return "full size" if model["full_size"] else "<b>TINY (random weights)</b>"


def write_report(out_dir: str | Path, results: list[dict], aggregate: dict[str, float],
                 models: list[dict], failures: dict[str, str], title: str = "freetalk evaluation") -> Path:
    """`out_dir/index.html` from the items' evaluation results (`tasks.evaluate.evaluate_item`),
    the aggregate, the models that ran (`freetalk_core.models.check.model_sizes`) and the items
    that could not be evaluated (item -> one-line reason)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = any(m["full_size"] is False for m in models)
    caption = "tiny random-weight models" if tiny else ""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if tiny:
        parts.append(f"<div class='tiny'>{TINY_WARNING}</div>")
    protocols = sorted({r["protocol"] for r in results})
    parts.append(f"<p>{len(results)} item(s) evaluated; protocol: {', '.join(protocols) or '-'}. "
                 "Paper figures: FreeTalkDiff Table 2, self-reconstruction.</p>")
    parts.append("<h2>Aggregate</h2>")
    parts.append(_table(["metric", f"this run (mean of {len(results)})", "paper HDTF", "paper CREMA"],
                        aggregate_rows(aggregate), caption))
    names = metric_order({k for r in results for k in r["metrics"]})
    parts.append("<h2>Items</h2>")
    parts.append(_table(["item", "protocol"] + [f"{n}{_direction(n)}" for n in names],
                        [[html.escape(r["item_id"]), r["protocol"]] + [_format(r["metrics"].get(n)) for n in names]
                         for r in results], caption))
    if failures:
        parts.append("<h2>Not evaluated</h2><ul>" + "".join(
            f"<li>{html.escape(item)}: {html.escape(reason)}</li>" for item, reason in sorted(failures.items()))
            + "</ul>")
    for r in results:
        parts.append(f"<h2>{html.escape(r['item_id'])} ({r['protocol']})</h2>")
        if r["notes"]:
            parts.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in r["notes"]) + "</ul>")
        for key, alt in (("lip_curves", "lip opening curves"), ("noise_patterns", "noise pattern heat maps"),
                         ("frame_strip", "frame strip")):
            if r["figures"].get(key):
                parts.append(f"<h3>{alt}</h3>" + _image(r["figures"][key], alt))
    parts.append("<h2>Models</h2>")
    parts.append(_table(["part", "path", "size"],
                        [[html.escape(m["part"]), html.escape(m["path"]),
                          _size_label(m)]
                         for m in models], caption))
    parts.append("</body></html>")
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
