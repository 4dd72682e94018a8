"""Reading an image back into the toy world's terms, exactly (no learned model).

measure(image) finds:
- the background colour: the median of the 2-pixel border ring, classified to the nearest
  BACKGROUND_COLOURS entry;
- the objects: pixels farther than FOREGROUND_DISTANCE (RGB) from that measured border colour,
  split into 8-connected components, keeping those of at least MIN_AREA pixels, largest first;
- for each object: colour (per-pixel vote for the nearest OBJECT_COLOURS entry; the sks colours
  take part in the vote so a pink/teal object is not forced onto the palette), shape (the object's
  bounding-box crop resampled to a 24x24 mask and compared by soft IoU with templates rendered by
  the world itself and measured the same way), size (bounding-box extent against the midpoint of
  the two size classes), position (bounding-box centre, nearest anchor) and its fidelity to the sks
  object (sks_fidelity).

sks fidelity compares the object's canonical crop with the canonical crop of the rendered sks
object: shape = soft IoU of the masks, pattern = fraction of the reference's object pixels whose
colour is within PATTERN_TOLERANCE (RGB distance) of the reference colour there (pink on the left
half, teal on the right; interior only, see _sks_reference). score = (shape + pattern) / 2. A rendered sks object scores ~1; a flat
palette-coloured shape scores roughly its IoU with the heart / 2; a heart in the wrong colours or
with the halves swapped loses the pattern half. All of it works on blurry generated images
(thresholds are distances to the measured background, not to exact palette values).
"""

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from . import world
from .world import BACKGROUND_COLOURS, IMAGE_SIZE, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, SKS_COLOURS, Obj, Scene

FOREGROUND_DISTANCE = 55.0
MIN_AREA = 10  # pixels at IMAGE_SIZE
CANON = 24  # side of the canonical crop
PATTERN_TOLERANCE = 70.0
PATTERN_MARGIN = 2  # canonical pixels
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2

_BG_NAMES = list(BACKGROUND_COLOURS)
_BG_RGB = np.array([BACKGROUND_COLOURS[n] for n in _BG_NAMES], np.float32)
_VOTE_NAMES = list(OBJECT_COLOURS) + list(SKS_COLOURS)
_VOTE_RGB = np.array([OBJECT_COLOURS.get(n) or SKS_COLOURS[n] for n in _VOTE_NAMES], np.float32)


@dataclass
class DetectedObject:
    area: int
    bbox: Tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive pixel indices
    centre: Tuple[float, float]  # bounding-box centre (x, y) in pixels, at IMAGE_SIZE
    extent: float  # larger bounding-box side in pixels, at IMAGE_SIZE
    colour: str  # majority of the per-pixel nearest colours (OBJECT_COLOURS or "pink"/"teal")
    colour_votes: Dict[str, float]
    shape: str  # best template among SHAPES
    shape_scores: Dict[str, float]
    size: str
    position: str
    sks: Dict[str, float]  # {"score", "shape", "pattern"}


@dataclass
class Measurement:
    background: str
    background_rgb: Tuple[float, float, float]
    objects: List[DetectedObject] = field(default_factory=list)

    def object_at(self, position: str) -> Optional[DetectedObject]:
        """The largest detected object whose position class is `position`."""
        for obj in self.objects:
            if obj.position == position:
                return obj
        return None


def to_array(image) -> np.ndarray:
    """PIL image / HxWx3 uint8 or float array (0..255 or 0..1) -> HxWx3 float32 0..255 at IMAGE_SIZE."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.max() <= 1.0 + 1e-6:
            a = a * 255.0
        a = np.clip(a, 0, 255)
    if a.shape[0] != IMAGE_SIZE or a.shape[1] != IMAGE_SIZE:
        a = np.asarray(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
    return a.astype(np.float32)


def _components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """8-connected labelling (labels 1..n, 0 = background) by min-label propagation."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big).astype(np.int64)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        new = np.where(mask, nb, big)
        if np.array_equal(new, labels):
            break
        labels = new
    uniq = np.unique(labels[mask])
    remap = np.zeros(h * w + 2, np.int64)
    remap[uniq] = np.arange(1, len(uniq) + 1)
    out = np.where(mask, remap[np.minimum(labels, h * w + 1)], 0)
    return out, len(uniq)


def _canonical(mask: np.ndarray, rgb: Optional[np.ndarray], box) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The bounding-box crop resampled to CANON x CANON (mask as float in [0,1], rgb 0..255)."""
    x0, y0, x1, y1 = box
    m = Image.fromarray((mask[y0:y1 + 1, x0:x1 + 1] * 255).astype(np.uint8))
    cm = np.asarray(m.resize((CANON, CANON), Image.BILINEAR), np.float32) / 255.0
    crgb = None
    if rgb is not None:
        c = Image.fromarray(np.clip(rgb[y0:y1 + 1, x0:x1 + 1], 0, 255).astype(np.uint8))
        crgb = np.asarray(c.resize((CANON, CANON), Image.BILINEAR), np.float32)
    return cm, crgb


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.minimum(a, b).sum()
    union = np.maximum(a, b).sum()
    return float(inter / union) if union > 0 else 0.0


def _foreground(a: np.ndarray):
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[2:-2, :2].reshape(-1, 3), a[2:-2, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    dist = np.linalg.norm(a - bg_rgb, axis=-1)
    return bg_rgb, dist > FOREGROUND_DISTANCE


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an H x W x C image (edge-replicating)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = sum(k[i] * p[i:i + a.shape[0], :, :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, i:i + a.shape[1], :] for i in range(2 * r + 1))


@lru_cache(maxsize=None)
def _templates() -> Dict[str, List[np.ndarray]]:
    """Canonical masks of every shape (and the sks heart), rendered by the world at both sizes on
    two contrasting backgrounds, sharp and blurred (generated images are softer than renders),
    and measured with the same segmentation as any image."""
    out: Dict[str, List[np.ndarray]] = {}
    for shape in list(SHAPES) + [world.SKS]:
        masks = []
        for size in SIZES:
            for bg in ("black", "white"):
                obj = Obj(shape, None if shape == world.SKS else "red", size, "center")
                sharp = world.render(Scene(bg, (obj,))).astype(np.float32)
                for a in (sharp, _blur(sharp, 0.8), _blur(sharp, 1.3)):
                    _, fg = _foreground(a)
                    ys, xs = np.nonzero(fg)
                    masks.append(_canonical(fg.astype(np.float32), None, (xs.min(), ys.min(), xs.max(), ys.max()))[0])
        out[shape] = masks
    return out


@lru_cache(maxsize=None)
def _sks_reference() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(canonical mask, canonical reference colours, where the pattern is scored) of the sks
    object. The pattern is scored on the interior only: the mask eroded by PATTERN_MARGIN canonical
    pixels and without the band of that half-width around the vertical midline, so that edge
    blending (anti-aliasing, resampling, a blurry sample) does not count as a wrong colour."""
    obj = Obj(world.SKS, None, "large", "center")
    alpha, colour = world.object_layers(obj)
    ys, xs = np.nonzero(alpha > 0.5)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    mask, _ = _canonical((alpha > 0.5).astype(np.float32), None, box)
    # the exact reference colour per canonical pixel: left half pink, right half teal
    cols = np.where(np.arange(CANON)[None, :, None] < CANON / 2, np.array(SKS_COLOURS["pink"], np.float32), np.array(SKS_COLOURS["teal"], np.float32))
    cols = np.broadcast_to(cols, (CANON, CANON, 3)).copy()
    inside = mask > 0.5
    for _ in range(PATTERN_MARGIN):
        p = np.pad(inside, 1, constant_values=False)
        inside = inside & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    column = np.arange(CANON)[None, :] + 0.5
    inside = inside & (np.abs(column - CANON / 2) >= PATTERN_MARGIN)
    return mask, cols, inside


def sks_fidelity_of(mask_c: np.ndarray, rgb_c: np.ndarray) -> Dict[str, float]:
    ref_mask, ref_rgb, inside = _sks_reference()
    shape = _soft_iou(mask_c, ref_mask)
    close = np.linalg.norm(rgb_c - ref_rgb, axis=-1) < PATTERN_TOLERANCE
    pattern = float(close[inside].mean())
    return {"score": (shape + pattern) / 2, "shape": shape, "pattern": pattern}


def _describe(comp: np.ndarray, a: np.ndarray) -> DetectedObject:
    ys, xs = np.nonzero(comp)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    centre = ((box[0] + box[2] + 1) / 2.0, (box[1] + box[3] + 1) / 2.0)
    pix = a[comp]
    nearest = np.argmin(((pix[:, None, :] - _VOTE_RGB[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(_VOTE_NAMES)) / len(pix)
    votes = {n: float(c) for n, c in zip(_VOTE_NAMES, counts)}
    colour = _VOTE_NAMES[int(np.argmax(counts))]
    mask_c, rgb_c = _canonical(comp.astype(np.float32), a, box)
    scores = {s: max(_soft_iou(mask_c, t) for t in ts) for s, ts in _templates().items() if s in SHAPES}
    shape = max(scores, key=scores.get)
    extent = float(max(w, h))
    size = "small" if extent < SIZE_THRESHOLD else "large"
    names = list(POSITIONS)
    anchors = np.array([POSITIONS[n] for n in names], np.float32)
    position = names[int(np.argmin(((anchors - np.array(centre, np.float32)) ** 2).sum(-1)))]
    return DetectedObject(
        area=int(comp.sum()), bbox=box, centre=centre, extent=extent, colour=colour, colour_votes=votes,
        shape=shape, shape_scores=scores, size=size, position=position, sks=sks_fidelity_of(mask_c, rgb_c),
    )


def measure(image, max_objects: int = 4) -> Measurement:
    a = to_array(image)
    bg_rgb, fg = _foreground(a)
    background = _BG_NAMES[int(np.argmin(((_BG_RGB - bg_rgb) ** 2).sum(-1)))]
    labels, n = _components(fg)
    comps = [labels == i for i in range(1, n + 1)]
    comps = [c for c in comps if c.sum() >= MIN_AREA]
    comps.sort(key=lambda c: -int(c.sum()))
    objects = [_describe(c, a) for c in comps[:max_objects]]
    return Measurement(background, tuple(float(v) for v in bg_rgb), objects)


def sks_fidelity(image, position: Optional[str] = None) -> Dict[str, float]:
    """Fidelity of the image's object to the sks object: the best-scoring detected object (or the
    one at `position` if given). No object: all zeros."""
    m = measure(image)
    candidates = [o for o in m.objects if position is None or o.position == position]
    if not candidates:
        return {"score": 0.0, "shape": 0.0, "pattern": 0.0}
    return max((o.sks for o in candidates), key=lambda s: s["score"])


# ----------------------------------------------------------------------------- scoring a prompt
ATTRIBUTES = ("background", "colour", "shape", "size", "position", "count")


def compare(spec: Scene, m: Measurement) -> Dict[str, Optional[bool]]:
    """Per-attribute correctness of a measured image against the scene the prompt described.
    Objects are matched by position class (two-object prompts) or taken as the largest detected
    object (one-object prompts; then position is checked too). An attribute the prompt leaves
    None is None (not scored). sks objects score 'shape'/'colour' as sks fidelity > 0.5."""
    out: Dict[str, Optional[bool]] = {"background": m.background == spec.background, "count": len(m.objects) == len(spec.objects)}
    per_obj = []
    for want in spec.objects:
        if len(spec.objects) == 1:
            got = m.objects[0] if m.objects else None
        else:
            got = m.object_at(want.position)
        r = {}
        if want.is_sks:
            r["shape"] = got is not None and got.sks["score"] > 0.5
            r["colour"] = None
        else:
            r["shape"] = got is not None and got.shape == want.shape if want.shape else None
            r["colour"] = got is not None and got.colour == want.colour if want.colour else None
        r["size"] = got is not None and got.size == want.size if want.size else None
        r["position"] = got is not None and got.position == want.position if want.position else None
        per_obj.append(r)
    for key in ("colour", "shape", "size", "position"):
        vals = [r[key] for r in per_obj if r[key] is not None]
        out[key] = all(vals) if vals else None
    return out


def chance_levels() -> Dict[str, float]:
    """Accuracy of guessing uniformly (per attribute, one object)."""
    return {
        "background": 1 / len(BACKGROUND_COLOURS), "colour": 1 / len(OBJECT_COLOURS), "shape": 1 / len(SHAPES),
        "size": 1 / len(SIZES), "position": 1 / len(POSITIONS),
    }
