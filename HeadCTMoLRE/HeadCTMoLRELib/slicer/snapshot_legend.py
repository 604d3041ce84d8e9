"""Annotate a rendered axial slice so a reader understands it at a glance (matplotlib's Agg canvas, no pyplot).

    annotate_axial_snapshot(rgba, path, SnapshotLegend(...)) -> path of the PNG

The slice image comes from Slicer's slice logic (``slicer.mrml_render``): an (H, W, 4) uint8 RGBA array in
the slice view's pixel frame, row 0 at the TOP, in the radiological convention of axial views (patient
right on the image's left, anterior at the top). Around it this module draws: the finding and its
probability (with the threshold), the slice position S in mm (RAS), L/R and A/P markers, a colour bar of
the overlay (attention weight per slice, or a finding's logit contribution) with its units and a mark at
this slice's value, the expert legend with the colour table's names (this slice's expert in bold), and
the model's status label when the model is synthetic, untrained or on a random backbone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["ColorScale", "SnapshotLegend", "annotate_axial_snapshot"]


@dataclass
class ColorScale:
    """The overlay's colours: ``colors`` (N, 3) RGB 0..1 from ``low`` to ``high`` (in ``units``)."""

    name: str
    units: str
    low: float
    high: float
    colors: np.ndarray
    value: float | None = None  # this slice's value, marked on the bar


@dataclass
class SnapshotLegend:
    """What the annotations say about one snapshot."""

    title: str  # e.g. "hydrocephalus  p = 0.93 (threshold 0.40, positive)"
    slice_s_mm: float  # RAS S of the slice (mm)
    scale: ColorScale | None = None
    experts: Sequence[tuple[str, tuple[float, float, float]]] = field(default_factory=tuple)
    slice_expert: int | None = None  # 1-based expert of this slice (bold in the legend)
    status_label: str = ""
    field_of_view_mm: float | None = None  # width of the image in mm, for the scale note


def _new_figure(width_in: float, height_in: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _draw_color_bar(axes, scale: ColorScale) -> None:
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.colorbar import ColorbarBase

    high = scale.high if scale.high > scale.low else scale.low + 1e-6
    bar = ColorbarBase(axes, cmap=ListedColormap(np.clip(scale.colors, 0, 1)), norm=Normalize(scale.low, high),
                       orientation="vertical")
    bar.set_label(f"{scale.name} ({scale.units})", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if scale.value is not None and np.isfinite(scale.value):
        axes.axhline(float(np.clip(scale.value, scale.low, high)), color="#00E5FF", linewidth=2.5)
        axes.text(-0.25, float(np.clip(scale.value, scale.low, high)), "this slice", transform=axes.get_yaxis_transform(),
                  fontsize=7, color="#007C8A", va="center", ha="right", clip_on=False)


def _draw_orientation_markers(axes, width: int, height: int) -> None:
    style = dict(color="white", fontsize=11, fontweight="bold", ha="center", va="center",
                 bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.55, linewidth=0))
    axes.text(0.035 * width, height / 2, "R", **style)  # radiological: patient right on the image's left
    axes.text(0.965 * width, height / 2, "L", **style)
    axes.text(width / 2, 0.04 * height, "A", **style)
    axes.text(width / 2, 0.96 * height, "P", **style)


def annotate_axial_snapshot(rgba: np.ndarray, path: str | os.PathLike, legend: SnapshotLegend, *,
                            dpi: int = 100) -> Path:
    """Write ``rgba`` (H, W, 3|4 uint8, row 0 at the top, radiological axial) with its annotations as a PNG."""
    image = np.asarray(rgba)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"annotate_axial_snapshot: expected an (H, W, 3|4) image, got shape {image.shape}")
    height, width = image.shape[:2]
    figure = _new_figure(7.6, 6.4, dpi)
    figure.patch.set_facecolor("white")
    top = 0.86 if legend.status_label else 0.9
    view = figure.add_axes((0.02, 0.17, 0.70, top - 0.2))
    view.imshow(image[..., :3], interpolation="nearest")
    view.set_axis_off()
    _draw_orientation_markers(view, width, height)
    position = f"axial slice S {legend.slice_s_mm:+.1f} mm (RAS)"
    if legend.field_of_view_mm:
        position += f", field of view {legend.field_of_view_mm:.0f} mm"
    view.text(0.01 * width, 0.995 * height, position, color="white", fontsize=8, ha="left", va="bottom",
              bbox=dict(facecolor="black", alpha=0.55, linewidth=0, pad=2))
    figure.text(0.02, top + 0.05, legend.title, fontsize=12, fontweight="bold", ha="left", va="center")
    if legend.status_label:
        figure.text(0.02, top + 0.005, legend.status_label, fontsize=8.5, color="#B00020", fontweight="bold",
                    ha="left", va="center", wrap=True)
    if legend.scale is not None:
        _draw_color_bar(figure.add_axes((0.82, 0.30, 0.035, top - 0.38)), legend.scale)
    if legend.experts:
        legend_axes = figure.add_axes((0.02, 0.01, 0.96, 0.13))
        legend_axes.set_axis_off()
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=rgb, edgecolor="black", label=name) for name, rgb in legend.experts]
        box = legend_axes.legend(handles=handles, loc="center", ncol=min(len(handles), 6), fontsize=8,
                                 frameon=False, title="Router's dominant expert per slice (outline colour)",
                                 title_fontsize=8)
        if legend.slice_expert is not None and 1 <= legend.slice_expert <= len(handles):
            text = box.get_texts()[legend.slice_expert - 1]
            text.set_fontweight("bold")
            text.set_text(f"{text.get_text()} (this slice)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", facecolor="white")
    return path
