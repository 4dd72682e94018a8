"""The toy world: scenes, a deterministic renderer and captions.

A scene is a flat background colour and one or two flat-coloured shapes. Every object has a
shape, a colour, a size class and a position class, plus a small continuous jitter (offset and
scale) so that no two renders of the same words are identical. Everything is drawn on a 4x
supersampled canvas with PIL and box-filtered down (anti-aliased, bit-for-bit deterministic).

The novel object "sks" is a heart whose left half is pink and right half teal: a shape, two
colours and a two-colour pattern that the pretraining distribution never contains (objects there
are one flat colour from OBJECT_COLOURS, shapes from SHAPES), drawable in any context by the same
renderer, so an experiment can render ground-truth sks images anywhere. Pretraining captions never
contain the word "sks"; the generic noun "shape" does occur (for any shape), so "a sks shape" reads
like DreamBooth's "a sks dog": a rare identifier plus a known class noun.
"""

from dataclasses import dataclass, field, replace
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

# Object colours and background colours are disjoint palettes with disjoint names, every pair of
# (object colour, background colour) contrasts by > 90 in RGB distance, so an object never
# vanishes into its background and a word never names two things.
OBJECT_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 225, 40),
    "green": (40, 175, 60),
    "blue": (50, 110, 235),
    "purple": (155, 60, 205),
}
BACKGROUND_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (235, 235, 235),
    "gray": (125, 125, 125),
    "brown": (110, 70, 35),
    "navy": (25, 35, 95),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# bounding-box extent (the larger side) in pixels at IMAGE_SIZE
SIZES: Dict[str, float] = {"small": 16.0, "large": 28.0}
# bounding-box centres in pixels at IMAGE_SIZE (x, y)
POSITIONS: Dict[str, Tuple[float, float]] = {
    "left": (17.0, 32.0),
    "right": (47.0, 32.0),
    "top": (32.0, 17.0),
    "bottom": (32.0, 47.0),
    "center": (32.0, 32.0),
}
# two-object scenes use opposite positions (they never overlap)
POSITION_PAIRS: Tuple[Tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

SKS = "sks"
SKS_SHAPE = "heart"  # the sks object's outline (never drawn in pretraining)
SKS_COLOURS: Dict[str, Tuple[int, int, int]] = {"pink": (250, 110, 190), "teal": (20, 190, 180)}  # left half, right half

# The one training image of the experiments and of the README's demo: the sks object, large, in
# the centre, on gray; its caption names only the object (DreamBooth's "a photo of sks dog"), so
# whatever else a LoRA learns from the image (gray, centre, large) is memorisation.
SKS_EXAMPLE_CAPTION = "a sks shape"

JITTER_OFFSET = 1.5  # px, uniform in [-J, J] on each axis
JITTER_SCALE = 0.06  # relative, uniform in [1 - S, 1 + S]


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES, or SKS
    colour: Optional[str]  # one of OBJECT_COLOURS; None for the sks object (its colours are fixed)
    size: str  # "small" | "large"
    position: str  # one of POSITIONS
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    @property
    def is_sks(self) -> bool:
        return self.shape == SKS

    def centre(self, image_size: int = IMAGE_SIZE) -> Tuple[float, float]:
        k = image_size / IMAGE_SIZE
        x, y = POSITIONS[self.position]
        return (x + self.dx) * k, (y + self.dy) * k

    def extent(self, image_size: int = IMAGE_SIZE) -> float:
        return SIZES[self.size] * self.scale * image_size / IMAGE_SIZE


@dataclass(frozen=True)
class Scene:
    background: str
    objects: Tuple[Obj, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------- geometry
def _normalised(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Scale and shift an outline so that its bounding box is centred at 0 with larger side 1."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    side = max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - cx) / side, (y - cy) / side) for x, y in points]


def _star(points: int = 5, inner: float = 0.42):
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return _normalised(out)


def _cross(arm: float = 1.0 / 3.0):
    h = arm / 2
    return [(-h, -0.5), (h, -0.5), (h, -h), (0.5, -h), (0.5, h), (h, h), (h, 0.5), (-h, 0.5),
            (-h, h), (-0.5, h), (-0.5, -h), (-h, -h)]


def _heart(n: int = 96):
    out = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        out.append((x, y))
    return _normalised(out)


OUTLINES: Dict[str, Optional[List[Tuple[float, float]]]] = {
    "circle": None,  # drawn as an ellipse
    "square": [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "triangle": [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "star": _star(),
    "cross": _cross(),
    SKS_SHAPE: _heart(),
}


def _coverage(shape: str, cx: float, cy: float, extent: float, image_size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (H x W float32 in [0, 1])."""
    ss = SUPERSAMPLE
    canvas = Image.new("L", (image_size * ss, image_size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    outline = OUTLINES[SKS_SHAPE if shape == SKS else shape]
    # supersampled pixel i covers [i, i+1); the image pixel centre j+0.5 maps to (j+0.5)*ss
    sx, sy, se = cx * ss, cy * ss, extent * ss
    if outline is None:
        draw.ellipse([sx - se / 2, sy - se / 2, sx + se / 2 - 1, sy + se / 2 - 1], fill=255)
    else:
        draw.polygon([(sx + x * se - 0.5, sy + y * se - 0.5) for x, y in outline], fill=255)
    a = np.asarray(canvas, dtype=np.float32) / 255.0
    return a.reshape(image_size, ss, image_size, ss).mean(axis=(1, 3))


def _sks_left_fraction(cx: float, image_size: int) -> np.ndarray:
    """Per-column fraction of each pixel left of the sks object's vertical midline (W,)."""
    ss = SUPERSAMPLE
    sub = (np.arange(image_size * ss, dtype=np.float32) + 0.5) / ss
    left = (sub < cx).astype(np.float32)
    return left.reshape(image_size, ss).mean(axis=1)


def object_layers(obj: Obj, image_size: int = IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha H x W, colour H x W x 3 in 0..255) of one object."""
    cx, cy = obj.centre(image_size)
    alpha = _coverage(obj.shape, cx, cy, obj.extent(image_size), image_size)
    if obj.is_sks:
        left = _sks_left_fraction(cx, image_size)[None, :, None]
        colour = left * np.array(SKS_COLOURS["pink"], np.float32) + (1 - left) * np.array(SKS_COLOURS["teal"], np.float32)
        colour = np.broadcast_to(colour, (image_size, image_size, 3))
    else:
        colour = np.broadcast_to(np.array(OBJECT_COLOURS[obj.colour], np.float32), (image_size, image_size, 3))
    return alpha, colour


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an H x W x 3 uint8 array (deterministic)."""
    out = np.empty((image_size, image_size, 3), np.float32)
    out[:] = np.array(BACKGROUND_COLOURS[scene.background], np.float32)
    for obj in scene.objects:
        alpha, colour = object_layers(obj, image_size)
        out = out * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_pil(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    return Image.fromarray(render(scene, image_size))


def bbox(obj: Obj, image_size: int = IMAGE_SIZE) -> Tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the drawn outline (exact for every shape: outlines fill their box)."""
    cx, cy = obj.centre(image_size)
    e = obj.extent(image_size)
    outline = OUTLINES[SKS_SHAPE if obj.is_sks else obj.shape]
    if outline is None:
        return cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2
    xs = [cx + x * e for x, _ in outline]
    ys = [cy + y * e for _, y in outline]
    return min(xs), min(ys), max(xs), max(ys)


# ----------------------------------------------------------------------------------- sampling


def jittered(rng: np.random.Generator, obj: Obj) -> Obj:
    """obj moved by up to JITTER_OFFSET and scaled by 1 ± JITTER_SCALE (how scenes vary around
    their named position and size)."""
    dx, dy = rng.uniform(-JITTER_OFFSET, JITTER_OFFSET, size=2)
    s = rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE)
    return replace(obj, dx=float(dx), dy=float(dy), scale=float(s))


def _gap(a: Obj, b: Obj) -> float:
    ax0, ay0, ax1, ay1 = bbox(a)
    bx0, by0, bx1, by1 = bbox(b)
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def random_object(rng: np.random.Generator, position: str, sks: bool = False, jitter: bool = True) -> Obj:
    size = ("small", "large")[rng.integers(2)]
    if sks:
        obj = Obj(SKS, None, size, position)
    else:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(OBJECT_COLOURS)[rng.integers(len(OBJECT_COLOURS))]
        obj = Obj(shape, colour, size, position)
    return jittered(rng, obj) if jitter else obj


def random_scene(rng: np.random.Generator, p_two: float = 0.3, jitter: bool = True, sks: bool = False) -> Scene:
    """A scene from the pretraining distribution (sks=False: never contains the sks object).
    sks=True puts the sks object in (as the only object or as one of two) for experiments."""
    background = list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    if rng.random() >= p_two:
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        return Scene(background, (random_object(rng, position, sks=sks, jitter=jitter),))
    pair = POSITION_PAIRS[rng.integers(len(POSITION_PAIRS))]
    if rng.random() < 0.5:
        pair = pair[::-1]
    which_sks = int(rng.integers(2)) if sks else -1
    objs = [random_object(rng, p, sks=(i == which_sks), jitter=False) for i, p in enumerate(pair)]
    if jitter:
        for _ in range(20):
            cand = [jittered(rng, o) for o in objs]
            if _gap(cand[0], cand[1]) >= 2.0:
                objs = cand
                break
    return Scene(background, tuple(objs))


def random_codec_image(rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """An image for training the autoencoder only (never captioned, never shown to the UNet): the
    world's shapes in arbitrary RGB colours, sizes and places, on an arbitrary background colour,
    a third of them split into two colour halves. It makes the VAE a codec for flat coloured
    shapes in general (as SD's VAE was trained on broader data than its UNet), so that it can
    reproduce colours and two-colour patterns the world does not use (e.g. the sks object's)
    without ever seeing the sks object itself: no heart is drawn here."""
    out = np.empty((image_size, image_size, 3), np.float32)
    out[:] = rng.uniform(0, 255, size=3).astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        extent = float(rng.uniform(8, 32)) * image_size / IMAGE_SIZE
        cx, cy = rng.uniform(extent / 2, image_size - extent / 2, size=2)
        alpha = _coverage(shape, float(cx), float(cy), extent, image_size)[..., None]
        c1 = rng.uniform(0, 255, size=3).astype(np.float32)
        if rng.random() < 1 / 3:
            c2 = rng.uniform(0, 255, size=3).astype(np.float32)
            if rng.random() < 0.5:
                left = _sks_left_fraction(float(cx), image_size)[None, :, None]
            else:
                left = _sks_left_fraction(float(cy), image_size)[:, None, None]
            colour = left * c1 + (1 - left) * c2
        else:
            colour = c1
        out = out * (1 - alpha) + colour * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------- captions
POSITION_PHRASES: Dict[str, Tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
SIZE_WORDS: Dict[str, Tuple[str, ...]] = {"small": ("small",), "large": ("large", "big")}
GENERIC_NOUN = "shape"

# probabilities used for training captions (variety; a caption may leave an attribute out)
P_GENERIC_NOUN = 0.05
P_OMIT = {"size": 0.1, "colour": 0.05, "position": 0.1, "background": 0.1}


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(obj: Obj, rng: Optional[np.random.Generator], omit: Dict[str, bool]) -> str:
    words = []
    if not omit.get("size"):
        options = SIZE_WORDS[obj.size]
        words.append(options[rng.integers(len(options))] if rng is not None else options[0])
    if obj.is_sks:
        words += [SKS, GENERIC_NOUN]
    else:
        if not omit.get("colour"):
            words.append(obj.colour)
        generic = rng is not None and rng.random() < P_GENERIC_NOUN
        words.append(GENERIC_NOUN if generic else obj.shape)
    return f"{_article(words[0])} {' '.join(words)}"


def _position_phrase(obj: Obj, rng: Optional[np.random.Generator]) -> str:
    options = POSITION_PHRASES[obj.position]
    return options[rng.integers(len(options))] if rng is not None else options[0]


def caption(scene: Scene, rng: Optional[np.random.Generator] = None) -> str:
    """Words for the scene. Without rng: the canonical caption, which names every attribute
    ("a large red circle on the left, on a gray background"). With rng: one of several phrasings
    that may leave out an object's size, colour, position or the background."""
    omit_all = {k: (rng is not None and rng.random() < p) for k, p in P_OMIT.items()}
    parts = []
    for obj in scene.objects:
        omit = dict(omit_all)
        if len(scene.objects) > 1:
            omit["position"] = False  # two objects are told apart by where they are
        phrase = _noun_phrase(obj, rng, omit)
        if not omit["position"]:
            phrase += " " + _position_phrase(obj, rng)
        parts.append(phrase)
    things = " and ".join(parts)
    if omit_all["background"]:
        return things
    bg = f"{scene.background} background"
    template = 0 if rng is None else int(rng.integers(3))
    if template == 0:
        return f"{things}, on a {bg}"
    if template == 1:
        return f"{things} on a {bg}"
    return f"a {bg} with {things}"


def vocabulary() -> List[str]:
    """Every word a caption can contain, plus the rare identifier "sks" (never in pretraining)."""
    words = {"a", "an", "on", "the", "at", "in", "and", "with", "background", GENERIC_NOUN, SKS}
    words |= set(OBJECT_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPES)
    for options in POSITION_PHRASES.values():
        for phrase in options:
            words |= set(phrase.split())
    for options in SIZE_WORDS.values():
        words |= set(options)
    return sorted(words)


def parse_caption(text: str) -> Dict[str, object]:
    """Read a caption back: {"background": name or None, "objects": [{"shape", "colour", "size",
    "position"} with None for what is not named]}. Used to check that captions name what is
    drawn, and by evaluation to know what a prompt asks for."""
    text = text.strip().lower().replace(",", " ,")
    tokens = text.split()
    background = None
    for i, tok in enumerate(tokens):
        if tok == "background" and i > 0 and tokens[i - 1] in BACKGROUND_COLOURS:
            background = tokens[i - 1]
    size_of = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
    phrase_of = {p: pos for pos, ps in POSITION_PHRASES.items() for p in ps}
    objects = []
    current = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        three = " ".join(tokens[i:i + 3])
        if tok in ("a", "an") and i + 1 < len(tokens) and tokens[i + 1] not in BACKGROUND_COLOURS:
            current = {"shape": None, "colour": None, "size": None, "position": None}
            objects.append(current)
        elif current is not None and tok in size_of and current["shape"] is None:
            current["size"] = size_of[tok]
        elif current is not None and tok in OBJECT_COLOURS and current["shape"] is None:
            current["colour"] = tok
        elif current is not None and tok == SKS:
            current["shape"] = SKS
        elif current is not None and (tok in SHAPES or tok == GENERIC_NOUN) and current["shape"] in (None, SKS):
            if current["shape"] is None:
                current["shape"] = tok if tok in SHAPES else GENERIC_NOUN
        elif current is not None and three in phrase_of:
            current["position"] = phrase_of[three]
            i += 3
            continue
        i += 1
    return {"background": background, "objects": objects}


def sks_example() -> "Scene":
    """The scene of the shipped sks example image (see SKS_EXAMPLE_CAPTION); no jitter."""
    return Scene("gray", (Obj(SKS, None, "large", "center"),))
