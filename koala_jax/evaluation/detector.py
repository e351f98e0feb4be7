"""Read the tiny world's attributes back from an image, and score images against prompts.

Why a hand-written detector rather than a classifier: it needs no training, is deterministic,
and its accuracy on the world's own renders can be asserted (about 100%), so when a generated
image is scored wrong it is the generator that is wrong, not the judge.

How it reads an image (`detect`), relying on the world's design (`koala_jax.data.world`):
- background: the median of the border pixels, matched to the nearest neutral background;
- objects: connected components of clearly saturated pixels (chroma = max - min channel), since
  backgrounds are neutral and object colours strongly saturated. Specks are ignored;
- coverage: blending a colour with a neutral background scales its chroma and keeps its hue, so
  chroma / object chroma is each pixel's sub-pixel coverage. Area and centroid come from it,
  which keeps them accurate at 32 px and under blur (blur moves mass, it does not create it);
- colour: the hue of the median of the object's core pixels, nearest palette hue;
- shape: for each shape, the template with the measured area and centroid is rendered (with
  supersampling) and blurred over a range of widths relative to its size; the shape whose best
  template is closest (least squares) to the object wins. Fitting blur instead of thresholding
  a fill ratio is what keeps circle and square apart when a generator softens corners. Blur also
  dims a small object's centre, so each shape's fit re-estimates the object's full chroma;
- size: the fitted template's side against the geometric mean of the two world sizes;
- grid cell: the fitted template's box centre against the midpoints between cell centres.

`score` then checks a `Detection` against a `PromptSpec` attribute by attribute (None where the
prompt is silent), and `accuracy` averages scores over a set of images.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from koala_jax.data import world
from koala_jax.data.world import ObjectConstraint, PromptSpec

# Chroma (max - min channel, uint8 units) above which a pixel belongs to an object: palette
# colours have chroma >= 180, neutral backgrounds ~0, so this sits well clear of both.
CHROMA_THRESHOLD = 70.0
# Components smaller than this fraction of the image are specks (a small world object is ~2%).
MIN_AREA_FRACTION = 0.004
# Largest RGB distance from a world background for the border to count as that background.
BACKGROUND_TOLERANCE = 60.0
# Coverage is integrated this far around each component (fraction of the image side) to catch
# the soft edges that blur spreads below the chroma threshold.
REGION_RADIUS_FRACTION = 0.08
# Blur widths tried when fitting shape templates, relative to the template's side.
RELATIVE_SIGMAS = (0.0, 0.03, 0.06, 0.1, 0.14, 0.19, 0.25, 0.32)
# A core pixel has at least this fraction of the object's chroma (used for its colour).
CORE_FRACTION = 0.8
# Times the object's own chroma is re-estimated from a fit whose template is dimmed by blur.
REFERENCE_ITERATIONS = 2
SIZE_THRESHOLD = math.sqrt(world.SIZE_FRACTION["small"] * world.SIZE_FRACTION["large"])
CELL_BOUNDARIES = tuple((a + b) / 2 for a, b in zip(world.CELL_CENTRES, world.CELL_CENTRES[1:]))
# Images whose shorter side is at least twice this are box-averaged by an integer factor first.
WORKING_SIDE = 128
UNKNOWN = "unknown"
SCORE_KEYS = ("colour", "shape", "colour_shape", "size", "position", "count", "relation", "background", "all")
_MAX_MATCHED = 8  # detections considered when matching prompt objects (largest first)


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One object found in an image. Coordinates are pixels; bbox is (x0, y0, x1, y1), end exclusive,
    of the thresholded component; area is the sub-pixel coverage in pixels."""

    colour: str
    shape: str
    size: str
    column: str
    row: str
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: float

    @property
    def cell(self) -> tuple[int, int]:
        """(column index, row index), as `world.ObjectSpec.cell`."""
        return world.COLUMNS.index(self.column), world.ROWS.index(self.row)


@dataclasses.dataclass(frozen=True)
class Detection:
    """What `detect` read from an image: background (or "unknown") and objects, largest first."""

    background: str
    objects: tuple[DetectedObject, ...]
    height: int
    width: int


# --- detection ----------------------------------------------------------------------------------


def _as_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return array.astype(np.float32)


def classify_background(rgb: np.ndarray) -> str:
    """The world background nearest the median border colour, or "unknown" if none is close."""
    h, w = rgb.shape[:2]
    b = max(1, round(min(h, w) / 32))
    border = np.concatenate(
        [rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3), rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)]
    )
    median = np.median(border, axis=0)
    distances = {name: float(np.linalg.norm(median - np.array(value))) for name, value in world.BACKGROUND_RGB.items()}
    best = min(distances, key=distances.__getitem__)
    return best if distances[best] <= BACKGROUND_TOLERANCE else UNKNOWN


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB values (last axis); 0 for neutral colours."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360


_PALETTE_HUES = {name: float(hue(np.array(value))) for name, value in world.COLOUR_RGB.items()}


def classify_colour(rgb: np.ndarray) -> str:
    """The palette colour whose hue is nearest (circularly) to the hue of `rgb` (one colour)."""
    h = float(hue(rgb))
    return min(_PALETTE_HUES, key=lambda name: abs((h - _PALETTE_HUES[name] + 180) % 360 - 180))


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """Whether points lie in `shape` with box centre (cx, cy) and box side `side` (as world.render)."""
    half = side / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    box = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "square":
        return box
    return box & (np.abs(x - cx) <= (y - (cy - half)) / 2)  # triangle, apex up


def _coverage(
    shape: str, cx: float, cy: float, side: float, origin: tuple[int, int], dims: tuple[int, int]
) -> np.ndarray:
    """Per-pixel coverage of a shape on the pixel grid of a crop at `origin` (y, x), `dims` (h, w)."""
    k = world.SUPERSAMPLE
    (y0, x0), (h, w) = origin, dims
    ys = y0 + (np.arange(h * k) + 0.5) / k
    xs = x0 + (np.arange(w * k) + 0.5) / k
    inside = _inside(shape, xs[None, :], ys[:, None], cx, cy, side)
    return inside.reshape(h, k, w, k).mean(axis=(1, 3))


def _template_box(shape: str, area: float, cx: float, cy: float) -> tuple[float, float, float]:
    """Box centre and side of the shape with this area and centroid (a triangle's centroid sits
    a sixth of its side below its box centre)."""
    if shape == "circle":
        return cx, cy, 2 * math.sqrt(area / math.pi)
    if shape == "square":
        return cx, cy, math.sqrt(area)
    side = math.sqrt(2 * area)
    return cx, cy - side / 6, side


@dataclasses.dataclass(frozen=True)
class ShapeFit:
    """A fitted template: shape, box centre and side (pixels), blur (pixels), the object's own
    chroma (what full coverage looks like) and the squared error of the fit (chroma units)."""

    shape: str
    cx: float
    cy: float
    side: float
    sigma: float
    amplitude: float
    error: float


def _fit_template(
    shape: str, crop: np.ndarray, origin: tuple[int, int], total: float, centroid: tuple[float, float], amplitude: float
) -> tuple[ShapeFit, float]:
    """The best blur for `shape` at this amplitude (its size follows from total / amplitude), and
    that template's 3x3-mean peak."""
    box = _template_box(shape, total / amplitude, *centroid)
    template = _coverage(shape, *box, origin, crop.shape)
    best: tuple[float, float, np.ndarray] | None = None
    for relative in RELATIVE_SIGMAS:
        sigma = relative * box[2]
        blurred = ndimage.gaussian_filter(template, sigma, mode="constant") if sigma else template
        error = float(np.sum((crop - amplitude * blurred) ** 2))
        if best is None or error < best[0]:
            best = (error, sigma, blurred)
    assert best is not None
    error, sigma, blurred = best
    peak = float(ndimage.uniform_filter(blurred, 3, mode="constant").max())
    return ShapeFit(shape, *box, sigma, amplitude, error), peak


def fit_shape(crop: np.ndarray, origin: tuple[int, int], centroid: tuple[float, float], peak: float) -> ShapeFit:
    """The shape whose blurred template best explains `crop` (chroma above background, a crop at
    `origin`, y then x, around one object whose 3x3-mean chroma peaks at `peak`).

    Each shape is fitted on its own terms: blur dims the centre of a small object, by how much
    depends on the shape, so the object's own chroma is taken as `peak` divided by the fitted
    template's peak, and the fit repeated. Errors are compared in chroma units, which do not
    depend on the amplitude each shape settled on.
    """
    total = float(crop.sum())
    fits = []
    for shape in world.SHAPES:
        amplitude = peak
        for iteration in range(REFERENCE_ITERATIONS + 1):
            fit, template_peak = _fit_template(shape, crop, origin, total, centroid, amplitude)
            if template_peak >= 0.98 or iteration == REFERENCE_ITERATIONS:
                break
            amplitude = peak / template_peak
        fits.append(fit)
    return min(fits, key=lambda f: f.error)


def _grid(fraction: float, names: tuple[str, ...]) -> str:
    return names[int(np.searchsorted(CELL_BOUNDARIES, fraction))]


def _measure(
    rgb: np.ndarray,
    chroma: np.ndarray,
    smoothed: np.ndarray,
    component: np.ndarray,
    region: np.ndarray,
    baseline: float,
) -> DetectedObject | None:
    """Describe one component; `region` (a superset) is where its soft edges are integrated."""
    h, w = chroma.shape
    peak = float(smoothed[component].max()) - baseline
    excess = np.where(region, np.clip(chroma - baseline, 0, None), 0.0)
    total = float(excess.sum())
    if peak <= 1e-3 or total <= 1e-3:
        return None
    ys, xs = np.nonzero(region)
    weights = excess[ys, xs]
    centroid = (float(np.sum(weights * (xs + 0.5)) / total), float(np.sum(weights * (ys + 0.5)) / total))
    # The first fit (amplitude = peak) is the largest a template gets; pad for its widest blur.
    pad = int(math.ceil(3 * max(RELATIVE_SIGMAS) * math.sqrt(2 * total / peak))) + 1
    y0, y1, x0, x1 = ys.min() - pad, ys.max() + 1 + pad, xs.min() - pad, xs.max() + 1 + pad
    crop = np.pad(excess, pad)[y0 + pad : y1 + pad, x0 + pad : x1 + pad]
    fit = fit_shape(crop, (int(y0), int(x0)), centroid, peak)
    core = component & (chroma >= CORE_FRACTION * peak + baseline)
    colour = classify_colour(np.median(rgb[core if core.any() else component], axis=0))
    cys, cxs = np.nonzero(component)
    return DetectedObject(
        colour=colour,
        shape=fit.shape,
        size="large" if fit.side / math.sqrt(h * w) > SIZE_THRESHOLD else "small",
        column=_grid(fit.cx / w, world.COLUMNS),
        row=_grid(fit.cy / h, world.ROWS),
        centroid=centroid,
        bbox=(int(cxs.min()), int(cys.min()), int(cxs.max()) + 1, int(cys.max()) + 1),
        area=total / fit.amplitude,
    )


def _components(chroma: np.ndarray) -> np.ndarray:
    """Labels (1..n) of the saturated components that are not specks; 0 elsewhere."""
    h, w = chroma.shape
    labels, n = ndimage.label(chroma > CHROMA_THRESHOLD, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return labels
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= MIN_AREA_FRACTION * h * w
    keep[0] = False
    relabel = np.zeros(n + 1, dtype=labels.dtype)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1)
    return relabel[labels]


def _downscale(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """Box-average large images to at most ~2x WORKING_SIDE: fitting cost grows with area, and a
    box average keeps chroma proportional to coverage, so nothing the detector reads is lost."""
    factor = max(1, min(rgb.shape[:2]) // WORKING_SIDE)
    if factor == 1:
        return rgb, 1
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    return rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3)), factor


def _rescale(obj: DetectedObject, factor: int) -> DetectedObject:
    """An object measured on a downscaled image, in the input image's pixels."""
    if factor == 1:
        return obj
    (cx, cy), bbox = obj.centroid, obj.bbox
    return dataclasses.replace(
        obj, centroid=(cx * factor, cy * factor), bbox=tuple(v * factor for v in bbox), area=obj.area * factor**2
    )


def _find_objects(rgb: np.ndarray) -> list[DetectedObject]:
    """The objects of an RGB float image, in no particular order."""
    h, w = rgb.shape[:2]
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    labels = _components(chroma)
    if labels.max() == 0:
        return []
    # Each pixel near an object belongs to its nearest component, so neighbours never share edges.
    distance, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    nearest = labels[iy, ix]
    near = distance <= max(2.0, round(REGION_RADIUS_FRACTION * math.sqrt(h * w)))
    baseline = float(np.median(chroma[~near])) if (~near).any() else 0.0
    smoothed = ndimage.uniform_filter(chroma, 3)
    found = (
        _measure(rgb, chroma, smoothed, labels == label, near & (nearest == label), baseline)
        for label in range(1, int(labels.max()) + 1)
    )
    return [obj for obj in found if obj is not None]


def detect(image: np.ndarray) -> Detection:
    """Background and objects (largest first) of a uint8 HxWx3 image, 32 to 256 px a side; see the
    module docstring for how. Coordinates and areas are in the input image's pixels."""
    rgb = _as_rgb(image)
    work, factor = _downscale(rgb)
    objects = sorted((_rescale(obj, factor) for obj in _find_objects(work)), key=lambda o: -o.area)
    return Detection(classify_background(work), tuple(objects), rgb.shape[0], rgb.shape[1])


# --- scoring ------------------------------------------------------------------------------------


def _object_checks(want: ObjectConstraint, got: DetectedObject | None) -> dict[str, bool | None]:
    """Per-attribute agreement of one detected object (None: missing) with one prompt object."""

    def check(*names: str) -> bool | None:
        wanted = [n for n in names if getattr(want, n) is not None]
        if not wanted:
            return None
        return got is not None and all(getattr(got, n) == getattr(want, n) for n in wanted)

    both = None if want.colour is None or want.shape is None else check("colour", "shape")
    return {
        "colour": check("colour"),
        "shape": check("shape"),
        "colour_shape": both,
        "size": check("size"),
        "position": check("column", "row"),
    }


def relation_holds(relation: str, first: DetectedObject, second: DetectedObject) -> bool:
    """Whether `first` is `relation` `second` by grid cells. Only the stated axis is checked (a
    "left of" object may also be higher): captions pick the dominant axis, but a generated image
    that is diagonal still satisfies the words."""
    (c1, r1), (c2, r2) = first.cell, second.cell
    return {"to the left of": c1 < c2, "to the right of": c1 > c2, "above": r1 < r2, "below": r1 > r2}[relation]


def _combine(results: Iterable[bool | None]) -> bool | None:
    """All of the constrained results (None when none is constrained)."""
    known = [r for r in results if r is not None]
    return None if not known else all(known)


def _score_matching(
    spec: PromptSpec, matched: Sequence[DetectedObject | None], detection: Detection
) -> tuple[tuple[int, int, int], dict[str, bool | None]]:
    """Scores for one matching of prompt objects to detected ones (None: unmatched), and its rank:
    objects right on colour+shape first, then attributes right, then objects found."""
    per_object = [_object_checks(want, got) for want, got in zip(spec.objects, matched)]
    result = {
        key: _combine(checks[key] for checks in per_object)
        for key in ("colour", "shape", "colour_shape", "size", "position")
    }
    result["count"] = len(detection.objects) == len(spec.objects)
    result["relation"] = None
    if spec.relation is not None:
        first, second = matched[0], matched[1]
        result["relation"] = first is not None and second is not None and relation_holds(spec.relation, first, second)
    result["background"] = None if spec.background is None else detection.background == spec.background
    result["all"] = _combine(result.values())
    rank = (
        sum(checks["colour_shape"] is True for checks in per_object),
        sum(checks[key] is True for checks in per_object for key in checks) + (result["relation"] is True),
        sum(m is not None for m in matched),
    )
    return rank, result


def score(detection: Detection, spec: PromptSpec) -> dict[str, bool | None]:
    """Whether the image satisfies each attribute the prompt constrains (None where it does not).

    Prompt objects are matched to distinct detected objects by trying every matching and keeping
    the best (most objects right on colour+shape, then most attributes right; larger objects win
    ties), so a one-object prompt takes its best detected object and a two-object prompt is matched
    by colour+shape. Keys: SCORE_KEYS; a per-object key is right only if right for every prompt
    object. `count` is wrong whenever the number of objects differs (so a one-object prompt whose
    image shows two objects is wrong on count, and on `all`).
    """
    candidates: list[DetectedObject | None] = list(detection.objects[:_MAX_MATCHED])
    candidates += [None] * len(spec.objects)
    best: tuple[tuple[int, int, int], dict[str, bool | None]] | None = None
    for matched in itertools.permutations(candidates, len(spec.objects)):
        ranked = _score_matching(spec, matched, detection)
        if best is None or ranked[0] > best[0]:
            best = ranked
    assert best is not None
    return best[1]


def accuracy(images: Iterable[np.ndarray], specs: Iterable[PromptSpec]) -> dict[str, float]:
    """Mean of each score key over the items that constrain it (NaN if none does), plus `n`."""
    totals = {key: [0, 0] for key in SCORE_KEYS}
    n = 0
    for image, spec in zip(images, specs, strict=True):
        n += 1
        for key, value in score(detect(image), spec).items():
            if value is not None:
                totals[key][0] += int(value)
                totals[key][1] += 1
    out = {key: (right / count if count else math.nan) for key, (right, count) in totals.items()}
    out["n"] = float(n)
    return out
