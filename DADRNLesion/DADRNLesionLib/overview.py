"""A montage a person can look at: lesion slices with the heatmap and the lesion contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .classes import LABEL_BY_KEY, LABEL_BY_VALUE
from .orientation import to_axial_frame
from .results import PipelineResult
from .volume import Volume

__all__ = ["render_overview", "pick_slices"]

TILE = 256
MAX_TILES = 12


def pick_slices(result: PipelineResult, limit: int = MAX_TILES) -> list[int]:
    """The most confident lesion slice of each run of consecutive lesion slices, then the next best."""
    lesion = sorted(result.lesion_slices, key=lambda s: s.slice_index)
    if not lesion:
        return [s.slice_index for s in sorted(result.slices, key=lambda s: s.slice_index)[len(result.slices) // 2 :][:1]]
    runs, current = [], [lesion[0]]
    for s in lesion[1:]:
        if s.slice_index == current[-1].slice_index + 1 and s.predicted_class == current[-1].predicted_class:
            current.append(s)
        else:
            runs.append(current)
            current = [s]
    runs.append(current)
    confidence = lambda s: float(s.probabilities.max())  # noqa: E731
    chosen = [max(run, key=confidence) for run in runs]
    rest = sorted((s for s in lesion if s not in chosen), key=confidence, reverse=True)
    picked = sorted((chosen + rest)[:limit], key=lambda s: s.slice_index)
    return [s.slice_index for s in picked]


def _inferno_lut() -> np.ndarray:
    # A perceptually ordered black-purple-orange-yellow ramp, interpolated from a few anchor colours.
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    x = np.linspace(0, len(anchors) - 1, 256)
    lo = np.floor(x).astype(int).clip(0, len(anchors) - 2)
    t = (x - lo)[:, None]
    return ((1 - t) * anchors[lo] + t * anchors[lo + 1]).astype(np.uint8)


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    from PIL import Image

    mode = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(img).resize(size, mode))


def render_overview(ct: Volume, result: PipelineResult, path: Path, window: tuple[float, float] = (-140.0, 260.0)) -> Path:
    from PIL import Image, ImageDraw

    axial, frame = to_axial_frame(ct)
    heat = frame.to_canonical(result.heatmap.array)
    labels = frame.to_canonical(result.labelmap.array)
    by_input_k = {s.slice_index: s for s in result.slices}
    wanted = pick_slices(result)
    # Slice indices in the results are input k; in the axial frame they may be reversed.
    canon_k = {}
    for kc in range(axial.shape[0]):
        k_in = frame.canonical_index_to_input(kc, 0, 0)[0] if frame.slice_axis_is_axial else kc
        canon_k[k_in] = kc
    lut = _inferno_lut()
    tiles = []
    rows_mm, cols_mm = axial.shape[1] * axial.spacing[1], axial.shape[2] * axial.spacing[0]
    scale = TILE / max(rows_mm, cols_mm)
    size = (max(1, int(round(cols_mm * scale))), max(1, int(round(rows_mm * scale))))
    for k_in in wanted:
        kc = canon_k.get(k_in)
        if kc is None:
            continue
        lo, hi = window
        gray = ((np.clip(axial.array[kc].astype(np.float32), lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
        h = heat[kc]
        colour = lut[(np.clip(h, 0, 1) * 255).astype(np.uint8)].astype(np.float32)
        alpha = (0.6 * np.clip(h, 0, 1))[..., None]
        rgb = (1 - alpha) * rgb + alpha * colour
        lab = labels[kc]
        for value in np.unique(lab):
            if value == 0:
                continue
            region = lab == value
            edge = region & ~(_erode(region))
            rgb[edge] = LABEL_BY_VALUE[int(value)].rgb
        tile = _resize(rgb.clip(0, 255).astype(np.uint8), size)
        canvas = Image.new("RGB", (TILE, TILE + 18), (0, 0, 0))
        canvas.paste(Image.fromarray(tile), ((TILE - size[0]) // 2, 18 + (TILE - size[1]) // 2))
        s = by_input_k.get(k_in)
        caption = f"k={k_in}"
        if s is not None:
            name = "normal" if s.predicted_class == "normal" else LABEL_BY_KEY[s.predicted_class].name
            caption += f"  {name} {float(s.probabilities.max()):.2f}"
        ImageDraw.Draw(canvas).text((4, 3), caption, fill=(255, 255, 255))
        tiles.append(canvas)
    if not tiles:
        tiles = [Image.new("RGB", (TILE, TILE + 18), (0, 0, 0))]
        ImageDraw.Draw(tiles[0]).text((4, 3), "no liver slices", fill=(255, 255, 255))
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * TILE, rows * (TILE + 18) + 22), (20, 20, 20))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, ((n % cols) * TILE, 22 + (n // cols) * (TILE + 18)))
    summary = result.report.get("summary", {}).get("finding", "")
    model = result.report.get("model", {}).get("id", "")
    ImageDraw.Draw(sheet).text((4, 5), f"{summary}   model: {model}", fill=(255, 255, 200))
    sheet.save(path)
    return path


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out
