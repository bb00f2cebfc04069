"""A synthetic sky: seeded galaxy-like images with clumps and known truth, so the loop runs offline.

Why: the whole "close the loop" path (simulated volunteers -> aggregation -> export -> train ->
predictions -> machine volunteer) needs images whose truth is known and that nothing has to be
downloaded for. The images are made to be learnable but not trivially:

- *smooth* galaxies are one elliptical Sérsic profile (index 1.5-4, axis ratio 0.45-1) in a
  red-yellow colour;
- *featured* galaxies are a small bulge, an inclined exponential disk with logarithmic spiral
  arms (one to three arms, random pitch and handedness) and/or a bar, bluer than smooth ones, with
  0-5 compact bright clumps sitting on the arms or in the disk (about a quarter have none);
- both draw their total flux and size from overlapping ranges, so morphology is carried by
  structure, not brightness; arms, bars and ellipticity have a direction, so orientation matters to
  a network that is not rotation-invariant;
- every image has a sky background, Gaussian read noise plus a signal-dependent term, a Gaussian
  PSF, and occasionally one or two foreground stars (point sources that are not clumps).

Geometry: pixel (row i, column j) has its centre at x = j + 0.5, y = i + 0.5 (top-left origin, the
convention of marks). The galaxy frame (u, v) has u along the major axis; an angle of θ degrees
turns it counter-clockwise as seen on the screen. Clump boxes are centre ± 2.5 sigma of the
PSF-blurred clump,
clipped to the image. Flux is in arbitrary counts (sky noise ≈ 1) mapped to 8 bits by a fixed
asinh stretch, so a faint galaxy looks faint.

Only numpy (the drawing, vectorised per image) and pillow (PNG writing) are used; no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MORPHOLOGIES = ("smooth", "featured")

Box = tuple[float, float, float, float]

_SMOOTH_COLOUR = (1.0, 0.82, 0.58)
_BULGE_COLOUR = (1.0, 0.86, 0.64)
_DISK_COLOUR = (0.78, 0.84, 1.0)
_CLUMP_COLOUR = (0.72, 0.88, 1.0)
_STRETCH_SOFT = 3.0  # asinh softening, in counts (about three times the sky noise)
_STRETCH_MAX = 400.0  # counts that map to 255
_BOX_SIGMAS = 2.5


@dataclass(frozen=True)
class Clump:
    """One clump in the galaxy frame: position (u, v) in pixels, intrinsic width, peak contrast."""

    u: float
    v: float
    sigma: float
    contrast: float
    floor: float  # minimum peak in counts: a clump on the faint outer disk still stands out


@dataclass(frozen=True)
class Star:
    """A foreground star, fixed on the sky (it does not turn with the galaxy)."""

    x: float
    y: float
    flux: float
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Recipe:
    """Everything needed to draw one image again at another orientation (see `render`)."""

    size: int
    morphology: str
    centre: tuple[float, float]
    flux: float
    axis_ratio: float
    radius: float  # smooth: effective radius; featured: disk scale length
    sersic_n: float
    bulge_fraction: float
    bar_fraction: float
    bar_length: float
    arms: int  # 0 for no spiral arms
    arm_strength: float
    pitch: float  # radians
    handedness: int  # +1 or -1: which way the arms wind
    arm_sharpness: float
    colour_jitter: tuple[float, float, float]
    clumps: tuple[Clump, ...]
    stars: tuple[Star, ...]
    psf_sigma: float
    background: float
    noise_gain: float
    noise_seed: int


@dataclass(frozen=True)
class SkyImage:
    """One synthetic subject: its pixels and the truth the generator knows about it."""

    subject_id: int
    pixels: np.ndarray  # (size, size, 3) uint8
    morphology: str  # one of MORPHOLOGIES
    clumps: tuple[Box, ...]  # x1, y1, x2, y2 in pixels, top-left origin
    angle: float  # orientation of the galaxy's major axis, degrees
    recipe: Recipe | None = field(default=None, repr=False, compare=False)


def generate(
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    first_id: int = 1,
    angles: tuple[float, float] = (0.0, 360.0),
) -> list[SkyImage]:
    """`n` images with subject ids first_id.. , the same for the same arguments.

    Morphologies alternate at random (half and half on average). `angles` bounds the galaxies'
    orientations, so a benchmark can train on one narrow range and test on others.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if size < 16:
        raise ValueError("size must be at least 16 pixels")
    low, high = float(angles[0]), float(angles[1])
    if high < low:
        raise ValueError("angles must be (low, high) with low <= high")
    rng = np.random.default_rng(seed)
    images = []
    for k in range(n):
        recipe = _draw_recipe(rng, size)
        angle = float(rng.uniform(low, high)) if high > low else low
        pixels, boxes = _draw(recipe, angle)
        images.append(
            SkyImage(
                subject_id=first_id + k,
                pixels=pixels,
                morphology=recipe.morphology,
                clumps=boxes,
                angle=angle,
                recipe=recipe,
            )
        )
    return images


def render(image: SkyImage, angle: float) -> np.ndarray:
    """The same galaxy drawn again turned by `angle` more degrees (same stars, sky and noise)."""
    if image.recipe is None:
        raise ValueError("this image has no recipe (it was not made by sky.generate)")
    pixels, _ = _draw(image.recipe, image.angle + angle)
    return pixels


def clump_boxes(image: SkyImage, angle: float) -> tuple[Box, ...]:
    """The clump boxes of `render(image, angle)`: the truth follows the galaxy when it turns."""
    if image.recipe is None:
        raise ValueError("this image has no recipe (it was not made by sky.generate)")
    return _boxes(image.recipe, image.angle + angle)


def write_images(images: Sequence[SkyImage], directory: Path) -> list[Path]:
    """Write each image as `<subject_id>.png` (the name an export gives it); return the paths."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        path = directory / f"{image.subject_id}.png"
        Image.fromarray(image.pixels, mode="RGB").save(path)
        paths.append(path)
    return paths


def write_truth(images: Sequence[SkyImage], path: Path) -> None:
    """JSON lines, one per image: subject_id, morphology, clumps (boxes), angle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for image in images:
            row = {
                "subject_id": image.subject_id,
                "morphology": image.morphology,
                "clumps": [list(box) for box in image.clumps],
                "angle": image.angle,
            }
            out.write(json.dumps(row) + "\n")


def read_truth(path: Path) -> list[dict[str, object]]:
    """The rows `write_truth` wrote."""
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


# --- drawing ------------------------------------------------------------------------------------


def _draw_recipe(rng: np.random.Generator, size: int) -> Recipe:
    """Random parameters of one image; every draw happens here, so a seed fixes the image."""
    scale = size / 64.0
    featured = bool(rng.random() < 0.5)
    centre = (
        size / 2 + float(rng.normal(0.0, 1.5 * scale)),
        size / 2 + float(rng.normal(0.0, 1.5 * scale)),
    )
    flux = float(np.exp(rng.uniform(np.log(1500.0), np.log(9000.0)))) * scale**2
    jitter = tuple(float(c) for c in rng.uniform(0.9, 1.1, 3))
    psf = float(rng.uniform(0.6, 1.1)) * scale
    if featured:
        radius = float(rng.uniform(4.0, 8.0)) * scale  # disk scale length
        axis_ratio = float(rng.uniform(0.35, 1.0))
        has_bar = bool(rng.random() < 0.5)
        arms = int(rng.choice([0, 1, 2, 2, 2, 3])) if has_bar else int(rng.choice([1, 2, 2, 2, 3]))
        bar_length = float(rng.uniform(0.9, 1.6)) * radius if has_bar else 0.0
        pitch = math.radians(float(rng.uniform(12.0, 30.0)))
        handedness = 1 if rng.random() < 0.5 else -1
        n_clumps = 0 if rng.random() < 0.25 else int(rng.integers(1, 6))
        clumps = _draw_clumps(rng, n_clumps, radius, arms, pitch, handedness, bar_length, scale)
        recipe_args: dict[str, Any] = {
            "sersic_n": float(rng.uniform(1.5, 3.0)),
            "bulge_fraction": float(rng.uniform(0.05, 0.35)),
            "bar_fraction": float(rng.uniform(0.1, 0.25)) if has_bar else 0.0,
            "bar_length": bar_length,
            "arms": arms,
            "arm_strength": float(rng.uniform(0.35, 0.9)),
            "pitch": pitch,
            "handedness": handedness,
            "arm_sharpness": float(rng.uniform(2.0, 5.0)),
        }
    else:
        radius = float(rng.uniform(4.0, 10.0)) * scale  # effective radius
        axis_ratio = float(rng.uniform(0.45, 1.0))
        clumps = ()
        recipe_args = {
            "sersic_n": float(rng.uniform(1.5, 4.0)),
            "bulge_fraction": 1.0,
            "bar_fraction": 0.0,
            "bar_length": 0.0,
            "arms": 0,
            "arm_strength": 0.0,
            "pitch": 0.0,
            "handedness": 1,
            "arm_sharpness": 1.0,
        }
    stars = []
    n_stars = int(rng.choice([0, 0, 0, 0, 0, 0, 1, 1, 1, 2]))
    for _ in range(n_stars):
        tint = float(rng.uniform(0.8, 1.0))
        stars.append(
            Star(
                x=float(rng.uniform(0, size)),
                y=float(rng.uniform(0, size)),
                flux=float(np.exp(rng.uniform(np.log(60.0), np.log(1500.0)))) * scale**2,
                colour=(1.0, tint, tint**2),
            )
        )
    return Recipe(
        size=size,
        morphology="featured" if featured else "smooth",
        centre=centre,
        flux=flux,
        axis_ratio=axis_ratio,
        radius=radius,
        colour_jitter=(jitter[0], jitter[1], jitter[2]),
        clumps=clumps,
        stars=tuple(stars),
        psf_sigma=psf,
        background=float(rng.uniform(1.0, 4.0)),
        noise_gain=float(rng.uniform(0.02, 0.08)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        **recipe_args,
    )


def _draw_clumps(
    rng: np.random.Generator,
    n: int,
    radius: float,
    arms: int,
    pitch: float,
    handedness: int,
    bar_length: float,
    scale: float,
) -> tuple[Clump, ...]:
    """Clumps in the disk plane, on a spiral arm when there are arms (where star formation is)."""
    clumps = []
    inner = max(bar_length, 0.8 * radius)
    for _ in range(n):
        r = float(rng.uniform(inner, 2.6 * radius))
        if arms:
            arm = int(rng.integers(0, arms))
            phi = float(_arm_phase(r, inner, pitch, handedness)) + 2 * math.pi * arm / arms
            phi += float(rng.normal(0.0, 0.15))
        else:
            phi = float(rng.uniform(0, 2 * math.pi))
        clumps.append(
            Clump(
                u=r * math.cos(phi),
                v=r * math.sin(phi),  # in the disk plane; inclination squeezes it when drawn
                sigma=float(rng.uniform(0.5, 1.1)) * scale,
                contrast=float(rng.uniform(1.5, 5.0)),
                floor=float(rng.uniform(10.0, 30.0)),
            )
        )
    return tuple(clumps)


def _arm_phase(r: float | np.ndarray, r0: float, pitch: float, handedness: int) -> np.ndarray:
    """Azimuth of a logarithmic spiral arm at radius r (arm starts at azimuth 0 at r0)."""
    return np.asarray(handedness * np.log(np.maximum(r, 1e-6) / r0) / math.tan(pitch))


def _galaxy_frame(
    recipe: Recipe, angle: float, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates -> galaxy-frame (u along the major axis, v across it)."""
    theta = math.radians(angle)
    dx = x - recipe.centre[0]
    dy = -(y - recipe.centre[1])  # y up, so positive angles turn counter-clockwise on screen
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    return u, v


def _to_image(recipe: Recipe, angle: float, u: float, v: float) -> tuple[float, float]:
    """Galaxy frame -> image coordinates (the inverse of `_galaxy_frame`)."""
    theta = math.radians(angle)
    dx = u * math.cos(theta) - v * math.sin(theta)
    dy = u * math.sin(theta) + v * math.cos(theta)
    return recipe.centre[0] + dx, recipe.centre[1] - dy


def _sersic(r: np.ndarray, r_e: float, n: float) -> np.ndarray:
    """Sérsic profile with b_n from the Ciotti & Bertin (1999) expansion."""
    b = 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n)
    return np.asarray(np.exp(-b * ((r / r_e) ** (1.0 / n) - 1.0)))


def _normalised(image: np.ndarray) -> np.ndarray:
    total = float(image.sum())
    return image / total if total > 0 else image


Layer = tuple[np.ndarray, tuple[float, float, float]]


def _galaxy_layers(recipe: Recipe, angle: float) -> list[Layer]:
    """Unblurred galaxy components (each summing to its share of the flux) and their colours."""
    size = recipe.size
    centres = np.arange(size, dtype=np.float64) + 0.5
    x, y = np.meshgrid(centres, centres)
    u, v = _galaxy_frame(recipe, angle, x, y)
    q = recipe.axis_ratio
    if recipe.morphology == "smooth":
        r = np.hypot(u, v / q)
        body = _normalised(_sersic(r, recipe.radius, recipe.sersic_n)) * recipe.flux
        return [(body, _SMOOTH_COLOUR)]
    v_disk = v / q  # de-projected: the disk is a circle seen at an inclination
    r = np.hypot(u, v_disk)
    bulge_r = np.hypot(u, v / max(q, 0.75))
    bulge = _sersic(bulge_r, 0.35 * recipe.radius, recipe.sersic_n)
    disk = np.exp(-r / recipe.radius)
    if recipe.arms:
        r0 = max(recipe.bar_length, 0.8 * recipe.radius)
        phi = np.arctan2(v_disk, u)
        phase = recipe.arms * (phi - _arm_phase(r, r0, recipe.pitch, recipe.handedness))
        arm = ((1.0 + np.cos(phase)) / 2.0) ** recipe.arm_sharpness
        onset = 1.0 - np.exp(-((r / (0.7 * r0)) ** 2))  # arms start outside the bulge/bar
        s = recipe.arm_strength * onset
        disk = disk * ((1.0 - s) + s * arm * (1.0 + recipe.arm_sharpness))
    layers: list[Layer] = [
        (_normalised(bulge) * recipe.flux * recipe.bulge_fraction, _BULGE_COLOUR),
        (
            _normalised(disk) * recipe.flux * (1 - recipe.bulge_fraction - recipe.bar_fraction),
            _DISK_COLOUR,
        ),
    ]
    if recipe.bar_fraction > 0:
        length = recipe.bar_length
        bar = np.exp(-0.5 * ((u / (0.55 * length)) ** 4 + (v_disk / (0.18 * length)) ** 2))
        layers.append((_normalised(bar) * recipe.flux * recipe.bar_fraction, _BULGE_COLOUR))
    return layers


def _clump_positions(recipe: Recipe, angle: float) -> list[tuple[float, float, Clump]]:
    """Image positions of the clumps at this orientation (inclination squeezes v)."""
    return [(*_to_image(recipe, angle, c.u, c.v * recipe.axis_ratio), c) for c in recipe.clumps]


def _clump_halfwidth(recipe: Recipe, clump: Clump) -> float:
    return _BOX_SIGMAS * math.hypot(clump.sigma, recipe.psf_sigma)


def _boxes(recipe: Recipe, angle: float) -> tuple[Box, ...]:
    """Boxes of the clumps whose centre lies inside the image, clipped to it."""
    size = float(recipe.size)
    boxes = []
    for x, y, clump in _clump_positions(recipe, angle):
        if not (0.0 <= x < size and 0.0 <= y < size):
            continue
        half = _clump_halfwidth(recipe, clump)
        boxes.append(
            (
                round(max(0.0, x - half), 3),
                round(max(0.0, y - half), 3),
                round(min(size, x + half), 3),
                round(min(size, y + half), 3),
            )
        )
    return tuple(boxes)


def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """Row-normalised 1-D Gaussian blur as a matrix (blur = K @ image @ K.T)."""
    idx = np.arange(size, dtype=np.float64)
    kernel = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return np.asarray(kernel / kernel.sum(axis=1, keepdims=True))


def _gaussian_spot(size: int, x: float, y: float, sigma: float) -> np.ndarray:
    centres = np.arange(size, dtype=np.float64) + 0.5
    gx = np.exp(-0.5 * ((centres - x) / sigma) ** 2)
    gy = np.exp(-0.5 * ((centres - y) / sigma) ** 2)
    return np.asarray(np.outer(gy, gx))


def _draw(recipe: Recipe, angle: float) -> tuple[np.ndarray, tuple[Box, ...]]:
    """Pixels (uint8, size x size x 3) and clump boxes of the recipe at this orientation."""
    size = recipe.size
    jitter = np.asarray(recipe.colour_jitter)
    sky = np.zeros((size, size, 3))
    local = np.zeros((size, size))
    for layer, colour in _galaxy_layers(recipe, angle):
        sky += layer[:, :, None] * (np.asarray(colour) * jitter)[None, None, :]
        local += layer
    for x, y, clump in _clump_positions(recipe, angle):
        i = min(max(int(y), 0), size - 1)
        j = min(max(int(x), 0), size - 1)
        peak = max(clump.contrast * float(local[i, j]), clump.floor)
        spot = _gaussian_spot(size, x, y, clump.sigma) * peak
        sky += spot[:, :, None] * (np.asarray(_CLUMP_COLOUR) * jitter)[None, None, :]
    blur = _gaussian_matrix(size, recipe.psf_sigma)
    sky = np.matmul(np.matmul(blur, sky.transpose(2, 0, 1)), blur.T).transpose(1, 2, 0)
    for star in recipe.stars:
        spot = _normalised(_gaussian_spot(size, star.x, star.y, recipe.psf_sigma)) * star.flux
        sky += spot[:, :, None] * np.asarray(star.colour)[None, None, :]
    noise_rng = np.random.default_rng(recipe.noise_seed)
    sigma = np.sqrt(1.0 + recipe.noise_gain * np.maximum(sky, 0.0))
    counts = sky + recipe.background + sigma * noise_rng.standard_normal(sky.shape)
    stretched = np.arcsinh(np.maximum(counts, 0.0) / _STRETCH_SOFT) / math.asinh(
        _STRETCH_MAX / _STRETCH_SOFT
    )
    pixels = np.clip(np.rint(stretched * 255.0), 0, 255).astype(np.uint8)
    return pixels, _boxes(recipe, angle)
