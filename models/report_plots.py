"""Evaluation pictures for MSFlow reports (ROC curves and example grids).

A reviewer judges a detector faster from a ROC plot and a grid of heatmaps
than from a table, so the evaluation step writes these PNGs next to the JSON
metrics. Rendering is headless: the Agg backend is selected before pyplot is
imported, and figures are built as ``matplotlib.figure.Figure`` objects that
are never registered with pyplot's global figure manager, so repeated calls
from a long-running process (trainer, service) neither leak figures nor
touch a display.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: must precede any pyplot import

import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from models.metrics import image_auroc, pixel_auroc  # noqa: E402

__all__ = ["plot_example_grid", "plot_roc_curves", "plot_score_distributions", "select_examples"]

#: Perceptually uniform colormap, readable in greyscale print as well.
HEATMAP_CMAP = "inferno"
#: Above this many pixels the pixel ROC *curve* is drawn from a subsample.
MAX_ROC_PIXELS = 500_000
_DPI = 100


def _save(fig: Figure, out_path: str | Path) -> Path:
    """Write ``fig`` as PNG, creating the parent folder; return the path."""
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _message(ax: Axes, text: str) -> None:
    """Put an explanation in an axis whose curve is undefined."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def _subsample_pixels(
    y: np.ndarray, s: np.ndarray, max_pixels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, class-stratified subsample for drawing a pixel ROC.

    Stratifying keeps the defect/normal ratio (and hence the curve's shape)
    while a fixed seed makes reports reproducible and diffable.
    """
    if y.size <= max_pixels:
        return y, s
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    frac = max_pixels / y.size
    k_pos = max(1, round(pos.size * frac)) if pos.size else 0
    k_neg = max(1, round(neg.size * frac)) if neg.size else 0
    idx = np.concatenate(
        (rng.choice(pos, k_pos, replace=False), rng.choice(neg, k_neg, replace=False))
    )
    idx.sort()
    return y[idx], s[idx]


def _draw_roc(ax: Axes, fpr: np.ndarray, tpr: np.ndarray, auc: float) -> None:
    """One ROC panel with the chance diagonal and the AUROC in the legend."""
    ax.plot(fpr, tpr, lw=2, color="tab:blue", label=f"AUROC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    ax.legend(loc="lower right")


def plot_roc_curves(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    out_path: str | Path,
    title: str = "",
    max_pixels: int = MAX_ROC_PIXELS,
) -> Path:
    """Image-level and pixel-level ROC side by side, saved as PNG.

    The legend AUROC is always the exact value over all pixels; only the
    drawn pixel curve comes from a deterministic subsample when there are
    more than ``max_pixels`` pixels (a curve with millions of vertices is
    slow to render and no more informative). Undefined panels (one class,
    no masks) show a note instead of failing, so a report is always written.
    """
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    fig = Figure(figsize=(12, 5.4))
    ax_img, ax_pix = fig.subplots(1, 2)
    for ax, name in ((ax_img, "Image-level ROC"), (ax_pix, "Pixel-level ROC")):
        ax.set_title(name)
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)

    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, s)
        _draw_roc(ax_img, fpr, tpr, image_auroc(y, s))
        ax_img.set_title(f"Image-level ROC ({int(y.sum())} defective / {int((y == 0).sum())} good)")
    else:
        _message(ax_img, "undefined: test set needs good and defective images")

    if masks is None or maps is None:
        _message(ax_pix, "no pixel annotations")
    else:
        m = np.asarray(masks) != 0
        a = np.asarray(maps)
        n_pos = int(np.count_nonzero(m))
        if 0 < n_pos < m.size:
            auc = pixel_auroc(m, a)
            ys, ss = _subsample_pixels(m.reshape(-1), a.reshape(-1), max_pixels)
            fpr, tpr, _ = roc_curve(ys, ss)
            _draw_roc(ax_pix, fpr, tpr, auc)
            note = "" if ys.size == m.size else f", curve from {ys.size:,} sampled px"
            ax_pix.set_title(f"Pixel-level ROC ({n_pos:,} defect px{note})")
        else:
            _message(ax_pix, "undefined: masks need defect and normal pixels")

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_path)


def select_examples(
    labels: np.ndarray,
    scores: np.ndarray,
    defect_types: Sequence[str],
    max_rows: int = 12,
) -> list[tuple[int, str]]:
    """Choose which images to show, deterministically, with a reason each.

    About a quarter of the rows go to the worst-ranked images (defective
    images with the lowest scores = likely misses, good images with the
    highest = likely false alarms), because failures are what a reviewer
    needs to see. The rest are filled round-robin over "good" and every
    defect type, most typical (closest to the group's median score) first,
    so every type is represented before any type gets a second row.

    Returns:
        ``[(index, reason), ...]`` with unique indices, at most ``max_rows``.
    """
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    types = [str(t) for t in defect_types]
    if not (y.size == s.size == len(types)):
        raise ValueError("labels, scores and defect_types must have the same length")
    if max_rows <= 0 or y.size == 0:
        return []

    chosen: list[tuple[int, str]] = []
    taken: set[int] = set()

    def take(i: int, reason: str) -> None:
        if i not in taken and len(chosen) < max_rows:
            taken.add(i)
            chosen.append((i, reason))

    # Stable sorts on (score, index) keep ties deterministic.
    defective = np.flatnonzero(y == 1)
    good = np.flatnonzero(y == 0)
    misses = defective[np.argsort(s[defective], kind="stable")]
    alarms = good[np.argsort(-s[good], kind="stable")]
    reasons = ("worst-ranked: lowest-scored defective", "worst-ranked: highest-scored good")
    worst = [
        (int(i), reason)
        for pair in zip_longest(misses, alarms)
        for i, reason in zip(pair, reasons)
        if i is not None
    ]
    for i, reason in worst[: math.ceil(max_rows / 4)]:
        take(i, reason)

    # Groups: "good" (by label) then each defect type, alphabetically.
    groups: list[np.ndarray] = [good] if good.size else []
    for t in sorted({types[i] for i in defective}):
        groups.append(np.asarray([i for i in defective if types[i] == t]))
    queues: list[deque[int]] = []
    for g in groups:
        dist = np.abs(s[g] - np.median(s[g]))
        queues.append(deque(int(i) for i in g[np.lexsort((g, dist))] if int(i) not in taken))
    while len(chosen) < max_rows and any(queues):
        for q in queues:
            if q:
                take(q.popleft(), "typical")
    return chosen


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Accept HxW, HxWx1 or HxWx3 uint8 and return HxWx3 for display."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def plot_example_grid(
    images: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    defect_types: Sequence[str],
    out_path: str | Path,
    max_rows: int = 12,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Grid of examples: input | ground truth | heatmap | overlay, one row each.

    All heatmaps share one colour range (``vmin``/``vmax`` if given, else the
    1st / 99.5th percentile of *all* maps) so that "hotter" means the same
    thing in every row; per-image normalisation would make a good image's
    noise look as alarming as a real defect. Rows are chosen by
    :func:`select_examples`. Maps whose resolution differs from the image's
    are stretched onto it via ``extent``.
    """
    imgs = np.asarray(images)
    m = np.asarray(masks) != 0
    a = np.asarray(maps, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(int).ravel()
    n = imgs.shape[0]
    if not (m.shape[0] == a.shape[0] == s.size == y.size == len(defect_types) == n):
        raise ValueError("images, masks, maps, scores, labels and defect_types must share N")
    if a.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got {a.shape}")

    lo = float(np.percentile(a, 1.0)) if vmin is None else float(vmin)
    hi = float(np.percentile(a, 99.5)) if vmax is None else float(vmax)
    if not hi > lo:  # constant maps: widen so imshow does not divide by zero
        hi = lo + 1e-6

    rows = select_examples(y, s, defect_types, max_rows) or [(0, "")]
    n_rows = len(rows)
    cell = 2.8
    fig = Figure(figsize=(4 * cell + 0.9, n_rows * cell + 0.6))
    axes = fig.subplots(n_rows, 4, squeeze=False)
    heat_artist = None
    col_titles = ("input", "ground truth", "anomaly map", "overlay")
    for r, (i, reason) in enumerate(rows):
        img = _to_rgb(imgs[i])
        h, w = img.shape[:2]
        extent = (0, w, h, 0)
        status = "defective" if y[i] else "good"
        row_title = f"{defect_types[i]} | {status} | score {s[i]:.4g}"
        if reason and reason != "typical":
            row_title += f"\n({reason})"
        ax_in, ax_gt, ax_hm, ax_ov = axes[r]
        ax_in.imshow(img, extent=extent)
        ax_in.set_ylabel(row_title, fontsize=8)
        ax_gt.imshow(img, extent=extent)
        if m[i].any():
            # Outline the defect on the input (contour at the 0/1 boundary at
            # pixel centres) so the texture under the defect stays visible.
            mh, mw = m[i].shape
            xs = (np.arange(mw) + 0.5) * (w / mw)
            ys = (np.arange(mh) + 0.5) * (h / mh)
            ax_gt.contour(xs, ys, m[i].astype(float), levels=[0.5], colors="lime", linewidths=1.5)
        else:
            ax_gt.text(0.03, 0.95, "no defect", color="lime", fontsize=8, va="top",
                       transform=ax_gt.transAxes, bbox={"facecolor": "black", "alpha": 0.6})
        heat_artist = ax_hm.imshow(a[i], cmap=HEATMAP_CMAP, vmin=lo, vmax=hi, extent=extent)
        ax_ov.imshow(img, extent=extent)
        ax_ov.imshow(a[i], cmap=HEATMAP_CMAP, vmin=lo, vmax=hi, alpha=0.5, extent=extent)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            if r == 0:
                ax.set_title(col_titles[c], fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    if heat_artist is not None:
        cax = fig.add_axes((0.945, 0.1, 0.015, 0.8))
        cbar = fig.colorbar(heat_artist, cax=cax)
        cbar.set_label(f"anomaly score (shared range {lo:.3g} .. {hi:.3g})", fontsize=8)
    return _save(fig, out_path)


def plot_score_distributions(
    scores: np.ndarray, labels: np.ndarray, groups: Sequence[str], threshold: float, out_path: str | Path,
    title: str = "image scores", score_name: str = "score",
) -> Path:
    """Histograms of image scores, good parts vs each defect group, with the threshold line.

    ``groups`` names each defective image's group (e.g. its tier); good images are those
    with label 0. What lies right of the line is flagged: good ones there are false alarms,
    defective ones left of it are missed.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    fig = Figure(figsize=(7.5, 4.0), dpi=_DPI)
    ax = fig.add_subplot(1, 1, 1)
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        _message(ax, "no finite scores")
        return _save(fig, out_path)
    bins = np.linspace(min(finite.min(), threshold), max(finite.max(), threshold), 40)
    series = [("good", s[y == 0])]
    names = np.asarray([str(g) for g in groups], dtype=object)
    series += [(f"defective: {g}", s[(y == 1) & (names == g)]) for g in sorted(set(names[y == 1]))]
    for name, values in series:
        if values.size:
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} ({values.size})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.3g}")
    ax.set_xlabel(score_name)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, out_path)
