"""The synthetic sky: seeded, shaped as documented, clumps only where they belong, orientations that
obey `angles` and `render`, and files named as an export names them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import sky


def _orientation(pixels: np.ndarray, centre: tuple[float, float], radius: float) -> float:
    """Major-axis angle (degrees, counter-clockwise on screen, modulo 180) of the light near the
    centre, from the intensity-weighted second moments above the median sky."""
    light = pixels.astype(np.float64).sum(axis=2)
    light = np.maximum(light - np.median(light), 0.0)
    rows, cols = np.indices(light.shape)
    dx = cols + 0.5 - centre[0]
    dy = -(rows + 0.5 - centre[1])
    light = np.where(np.hypot(dx, dy) < radius, light, 0.0)
    total = light.sum()
    xx = (light * dx * dx).sum() / total
    yy = (light * dy * dy).sum() / total
    xy = (light * dx * dy).sum() / total
    return math.degrees(0.5 * math.atan2(2 * xy, xx - yy)) % 180.0


def _angle_gap(a: float, b: float) -> float:
    """Distance between two axis orientations (modulo 180 degrees)."""
    gap = abs(a - b) % 180.0
    return min(gap, 180.0 - gap)


def test_the_same_seed_gives_the_same_sky_and_another_seed_another() -> None:
    """A seed fixes every pixel, clump and angle; changing it changes the images."""
    first = sky.generate(12, size=48, seed=5)
    again = sky.generate(12, size=48, seed=5)
    other = sky.generate(12, size=48, seed=6)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.pixels, b.pixels)
        assert (a.subject_id, a.morphology, a.clumps, a.angle) == (
            b.subject_id,
            b.morphology,
            b.clumps,
            b.angle,
        )
    assert any(not np.array_equal(a.pixels, c.pixels) for a, c in zip(first, other, strict=True))


def test_images_have_the_documented_shapes_ids_and_both_morphologies() -> None:
    """Pixels are (size, size, 3) uint8, ids run from first_id, and both morphologies appear."""
    images = sky.generate(40, size=56, seed=2, first_id=1000)
    assert [im.subject_id for im in images] == list(range(1000, 1040))
    for im in images:
        assert im.pixels.shape == (56, 56, 3)
        assert im.pixels.dtype == np.uint8
        assert im.morphology in sky.MORPHOLOGIES
    assert {im.morphology for im in images} == set(sky.MORPHOLOGIES)
    # Not a blank frame: the galaxy is brighter than the sky around it.
    im = images[0]
    assert im.pixels[20:36, 20:36].mean() > im.pixels[:6, :6].mean() + 5


def test_clumps_lie_inside_the_image_and_only_in_featured_galaxies() -> None:
    """Every box is inside the frame with x2 > x1 and y2 > y1; smooth galaxies have none; most
    featured galaxies have some and some have none."""
    images = sky.generate(120, size=64, seed=3)
    featured = [im for im in images if im.morphology == "featured"]
    for im in images:
        if im.morphology == "smooth":
            assert im.clumps == ()
        for x1, y1, x2, y2 in im.clumps:
            assert 0.0 <= x1 < x2 <= 64.0
            assert 0.0 <= y1 < y2 <= 64.0
    with_clumps = sum(1 for im in featured if im.clumps)
    assert with_clumps > len(featured) / 2
    assert with_clumps < len(featured)
    assert max(len(im.clumps) for im in featured) <= 5


def test_clumps_are_brighter_than_the_disk_around_them() -> None:
    """A clump box is brighter at its centre than at its edge: there is something to detect."""
    images = [im for im in sky.generate(60, size=64, seed=4) if im.clumps]
    contrasts = []
    for im in images:
        light = im.pixels.astype(np.float64).sum(axis=2)
        for x1, y1, x2, y2 in im.clumps:
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            ring = light[max(int(y1), 0) : int(y2), max(int(x1), 0) : int(x2)]
            contrasts.append(light[cy, cx] - np.median(ring))
    assert np.median(contrasts) > 0


def test_total_brightness_alone_does_not_tell_the_morphologies_apart() -> None:
    """The best single threshold on summed pixel values classifies at most ~70%: the structure has
    to be learnt."""
    images = sky.generate(200, size=48, seed=7)
    brightness = np.array([im.pixels.astype(np.float64).sum() for im in images])
    featured = np.array([im.morphology == "featured" for im in images])
    best = max(
        max(((brightness >= t) == featured).mean(), ((brightness < t) == featured).mean())
        for t in np.unique(brightness)
    )
    assert best < 0.7


def test_angles_bounds_the_orientations() -> None:
    """Orientations are drawn inside `angles`; a degenerate range gives exactly that angle."""
    images = sky.generate(30, size=32, seed=1, angles=(10.0, 20.0))
    assert all(10.0 <= im.angle <= 20.0 for im in images)
    assert {im.angle for im in sky.generate(5, size=32, seed=1, angles=(45.0, 45.0))} == {45.0}
    with pytest.raises(ValueError, match="angles"):
        sky.generate(1, angles=(20.0, 10.0))


def test_render_turns_the_galaxy_and_its_clumps() -> None:
    """render(image, 0) is the image itself; render(image, 90) turns an elongated galaxy's major
    axis by 90 degrees, and the clump truth turns with it."""
    images = sky.generate(60, size=64, seed=11, angles=(30.0, 30.0))
    smooth = [
        im
        for im in images
        if im.morphology == "smooth"
        and im.recipe is not None
        and im.recipe.axis_ratio < 0.65
        and not im.recipe.stars
    ]
    assert smooth, "the seed should give an elongated smooth galaxy without stars"
    for im in smooth[:3]:
        assert im.recipe is not None
        assert np.array_equal(sky.render(im, 0.0), im.pixels)
        before = _orientation(im.pixels, im.recipe.centre, 14.0)
        after = _orientation(sky.render(im, 90.0), im.recipe.centre, 14.0)
        assert _angle_gap(before, 30.0) < 12.0
        assert _angle_gap(after, 120.0) < 12.0
    clumpy = next(im for im in images if len(im.clumps) >= 2)
    assert sky.clump_boxes(clumpy, 0.0) == clumpy.clumps
    turned = sky.clump_boxes(clumpy, 90.0)
    assert turned != clumpy.clumps
    assert not np.array_equal(sky.render(clumpy, 90.0), clumpy.pixels)


def test_write_images_and_truth_name_files_by_subject_id(tmp_path: Path) -> None:
    """Files are `<subject_id>.png` and read back pixel for pixel; the truth is one JSON line per
    image with the generator's morphology, clumps and angle."""
    images = sky.generate(4, size=32, seed=9, first_id=70)
    paths = sky.write_images(images, tmp_path / "images")
    assert [p.name for p in paths] == ["70.png", "71.png", "72.png", "73.png"]
    for im, path in zip(images, paths, strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), im.pixels)
    sky.write_truth(images, tmp_path / "truth.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert [r["subject_id"] for r in rows] == [70, 71, 72, 73]
    for im, row in zip(images, rows, strict=True):
        assert row["morphology"] == im.morphology
        assert [tuple(b) for b in row["clumps"]] == list(im.clumps)
        assert row["angle"] == im.angle
    assert sky.read_truth(tmp_path / "truth.jsonl") == rows
