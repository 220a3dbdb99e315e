"""The report's pictures: compare.png (latency, quality, and speed vs quality of every candidate and FP
reference) and samples.png (one row per model, same noise per column, the images farthest from FP32 framed red).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..atomic import atomic_write

MARK_TOP_K = 4
MARK_COLOR = (220, 30, 30)


def report_entries(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, entry): the FP32 teacher, the candidates, then the FP references other than the teacher (compare
    lists the teacher first among its `references`)."""
    ref = report["reference"]
    return ([("teacher", ref)] + [("candidate", c) for c in report.get("candidates", [])]
            + [("fp-reference", r) for r in report.get("references") or [] if r.get("name") != ref.get("name")])


def quality_axis(report: dict[str, Any]) -> Optional[str]:
    """The to-FP32 metric the chart plots: KID when measured (unbiased at small N), else FID."""
    others = [e for kind, e in report_entries(report) if kind != "teacher"]
    for key in ("kid_to_fp32", "fid_to_fp32"):
        if any(e.get(key) is not None for e in others):
            return key
    return None


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report_entries(report)
    names = [f"{e['name']}\n{e.get('steps')} steps" for _, e in rows]
    colors = {"teacher": "#333333", "candidate": "#dd8452", "fp-reference": "#4c72b0"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    axes[0].bar(names, [e.get("ms_per_image") or 0 for _, e in rows], color=[colors[k] for k, _ in rows])
    axes[0].set_ylabel("ms per image")
    axes[0].set_title(f"latency ({str(report.get('device', ''))[:40]})", fontsize=9)
    axes[1].bar(names, [e.get("fid_to_fp32") or 0 for _, e in rows], color=[colors[k] for k, _ in rows])
    axes[1].set_ylabel("FID to FP32 100-step")
    axes[1].set_title(f"quality ({report.get('samples')} samples)", fontsize=9)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7, rotation=25)
    _speed_quality(axes[2], report, rows, colors)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _speed_quality(ax, report: dict[str, Any], rows, colors: dict[str, str]) -> None:
    key = quality_axis(report)
    ax.set_xlabel("ms per image (lower is faster)")
    if key is None:
        ax.text(0.5, 0.5, "no quality numbers (--no-fid)", ha="center", va="center", transform=ax.transAxes)
        return
    label = "KID to FP32 100-step" if key == "kid_to_fp32" else "FID to FP32 100-step"
    ax.set_ylabel(f"{label} (lower is closer)")
    ax.set_title("speed vs quality (lower left is better)", fontsize=9)
    missing = []
    for kind, e in rows:
        x, y = e.get("ms_per_image"), (0.0 if kind == "teacher" else e.get(key))
        if x is None or y is None:
            missing.append(e["name"])
            continue
        ax.scatter([x], [y], s=60, marker="*" if kind == "teacher" else ("o" if kind == "candidate" else "s"),
                   color=colors[kind], zorder=3)
        std = e.get("kid_to_fp32_std") if key == "kid_to_fp32" else None
        if std:
            ax.errorbar([x], [y], yerr=[std], color=colors[kind], capsize=3, lw=1)
        ax.annotate(f"{e['name']} ({e.get('steps')})", (x, y), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    for kind, lab in (("teacher", "FP32 teacher"), ("candidate", "quantized candidate"),
                      ("fp-reference", "FP reference")):
        if any(k == kind for k, _ in rows):
            ax.scatter([], [], color=colors[kind], label=lab)
    ax.legend(fontsize=7, loc="best")
    ax.margins(x=0.2, y=0.1)
    ax.grid(alpha=0.3)
    if missing:
        ax.text(0.01, 0.01, "not scored: " + ", ".join(missing)[:80], transform=ax.transAxes, fontsize=7)


def marked_pairs(pair_mse: Optional[np.ndarray], n_shown: int, k: int = MARK_TOP_K) -> list[int]:
    """Columns (< n_shown) of the k shown pairs farthest from FP32 by pixel MSE (identical pairs never)."""
    if pair_mse is None:
        return []
    from ..metrics.paired import most_different

    return most_different(pair_mse, k, n_shown)


def samples_png(images: dict[str, Any], path: Path, pair_mse: Optional[dict[str, np.ndarray]] = None,
                n: int = 16, k: int = MARK_TOP_K) -> dict[str, list[int]]:
    """One row per model, same initial noise in each column (FP32 100-step first); in each candidate row the k
    images farthest from their FP32 pair get a red frame. Returns the framed columns per model."""
    from PIL import Image, ImageDraw

    rows = list(images.items())
    n = min(n, rows[0][1].shape[0])
    c, h, w = rows[0][1].shape[1:]
    label_w, pad, legend_h = 130, 3, 14
    canvas = Image.new("RGB", (label_w + n * (w + pad) + pad, len(rows) * (h + pad) + pad + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    marked: dict[str, list[int]] = {}
    for r, (name, imgs) in enumerate(rows):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 5), "FP32 100-step" if name == "reference" else name[:20], fill=(0, 0, 0))
        cols = [] if name == "reference" else marked_pairs((pair_mse or {}).get(name), n, k)
        marked[name] = cols
        for i in range(n):
            arr = np.asarray(imgs[i].numpy() if hasattr(imgs[i], "numpy") else imgs[i])
            tile = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0)).convert("RGB")
            x = label_w + pad + i * (w + pad)
            canvas.paste(tile, (x, y))
            if i in cols:
                draw.rectangle((x - 1, y - 1, x + w, y + h), outline=MARK_COLOR, width=1)
    if any(marked.values()):
        draw.text((4, canvas.height - legend_h + 1), f"red frame: the {k} images per row (of {n} shown) farthest "
                  "from the FP32 image of the same noise (pixel MSE)", fill=MARK_COLOR)
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return marked
