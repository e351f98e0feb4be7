"""The tiny world (koala_jax.data.world) and its detector (koala_jax.evaluation.detector).

The detector is the judge of every later experiment on this world, so it is held to near-perfect
agreement with the ground truth on the world's own renders (clean, and blurred + noisy as a
generator's output would be), and `score` is checked to actually fail wrong images.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from koala_jax.data import world
from koala_jax.data.world import ObjectSpec, Scene
from koala_jax.evaluation import detector

N_SCENES = 300
ATTRIBUTES = ("colour", "shape", "size", "position", "background", "count", "relation")


def _degrade(image: np.ndarray, rng: np.random.Generator, sigma: float = 1.0, noise: float = 4.0) -> np.ndarray:
    """A Gaussian blur and a little noise: roughly what a VAE decoder or a small generator adds."""
    blurred = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
    return np.clip(np.round(blurred + rng.normal(0.0, noise, image.shape)), 0, 255).astype(np.uint8)


def _agreement(resolution: int, degrade: bool) -> dict[str, float]:
    """Fraction of scenes on which the detector reads each attribute right, all objects' cells included."""
    rng = np.random.default_rng(1234)
    right: dict[str, list[bool]] = {key: [] for key in ATTRIBUTES}
    for scene in world.scenes(N_SCENES, seed=3):
        image = world.render(scene, resolution)
        if degrade:
            image = _degrade(image, rng)
        result = detector.score(detector.detect(image), world.scene_spec(scene))
        for key in ATTRIBUTES:
            if result[key] is not None:
                right[key].append(bool(result[key]))
    return {key: float(np.mean(values)) for key, values in right.items()}


# --- world ---------------------------------------------------------------------------------------


def test_scenes_are_deterministic_per_seed_and_index():
    first = world.scenes(40, seed=5)
    assert world.scenes(10, seed=5) == first[:10]
    assert world.World(5).scene(37) == first[37]
    assert [world.caption(s) for s in world.scenes(40, seed=5)] == [world.caption(s) for s in first]
    np.testing.assert_array_equal(world.render(first[7]), world.render(world.World(5).scene(7)))
    assert world.scenes(40, seed=6) != first


def test_scenes_respect_the_layout_rules():
    sampled = world.scenes(400, seed=0)
    counts = [len(s.objects) for s in sampled]
    assert 0.35 < counts.count(2) / len(counts) < 0.65 and set(counts) == {1, 2}
    for scene in sampled:
        assert hash(scene) == hash(Scene(scene.background, tuple(scene.objects)))
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.cell != b.cell and (a.colour, a.shape) != (b.colour, b.shape)
            assert world.compatible(a, b)


def test_render_is_uint8_with_objects_inside_the_image():
    scene = Scene("grey", (ObjectSpec("square", "red", "large", "right", "bottom"),))
    for size in (32, 64):
        image = world.render(scene, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        # A large object in a corner cell leaves the border rows and columns background.
        np.testing.assert_array_equal(image[-1, -1], world.BACKGROUND_RGB["grey"])
        assert tuple(image[int(0.8 * size), int(0.8 * size)]) == world.COLOUR_RGB["red"]


def test_short_and_rich_captions():
    a = ObjectSpec("circle", "red", "large", "left", "top")
    b = ObjectSpec("square", "blue", "small", "right", "top")
    assert world.caption(Scene("grey", (a,)), "short") == "a red circle"
    assert world.caption(Scene("grey", (a, b)), "short") == "a red circle and a blue square"
    assert world.caption(Scene("grey", (a,)), "rich") == (
        "a large red circle in the top left corner on a grey background"
    )
    assert world.caption(Scene("grey", (a, b)), "rich") == (
        "a large red circle in the top left corner on a grey background, to the left of a small blue square"
    )
    c = ObjectSpec("triangle", "green", "small", "centre", "bottom")
    assert world.caption(Scene("white", (c, a)), "rich") == (
        "a small green triangle at the bottom on a white background, below a large red circle"
    )
    assert world.relation(a, c) == "above"  # cells differ by 1 column, 2 rows: vertical dominates


def test_rich_captions_state_every_attribute():
    for scene in world.scenes(200, seed=1):
        text = world.caption(scene, "rich")
        first = scene.objects[0]
        assert f"a {first.size} {first.colour} {first.shape} " in text
        assert world.position_phrase(first.column, first.row) in text
        assert f"on a {scene.background} background" in text
        if len(scene.objects) == 2:
            second = scene.objects[1]
            assert text.endswith(f", {world.relation(first, second)} a {second.size} {second.colour} {second.shape}")


def test_vocabulary_covers_every_caption():
    vocabulary = set(world.vocabulary())
    for scene in world.scenes(300, seed=2):
        for style in world.STYLES:
            text = world.caption(scene, style)
            assert set(world.words(text)) <= vocabulary, text
            assert "".join(world.words(text)) == re.sub(r"\s", "", text)
    assert {*world.COLOURS, *world.SHAPES, *world.SIZES, *world.BACKGROUNDS} <= vocabulary


def test_single_object_prompts_cover_every_colour_and_shape():
    prompts = world.single_object_prompts()
    texts = {p.text for p in prompts}
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            assert f"a {colour} {shape}" in texts
    for prompt in prompts:
        (only,) = prompt.spec.objects
        assert only.size is None and only.column is None and only.row is None
        assert prompt.spec.background is None and prompt.spec.relation is None


def test_rich_prompts_mix_one_and_two_objects_with_relations():
    prompts = world.rich_prompts(20, seed=0)
    assert world.rich_prompts(8, seed=0) == prompts[:8]
    assert {len(p.spec.objects) for p in prompts} == {1, 2}
    for prompt in prompts:
        first = prompt.spec.objects[0]
        assert None not in (first.size, first.column, first.row, prompt.spec.background)
        assert (prompt.spec.relation is not None) == (len(prompt.spec.objects) == 2)
        assert prompt.spec.relation is None or prompt.spec.relation in prompt.text


def test_world_collection_records():
    collection = world.WorldCollection(12, seed=4, style="rich", resolution=32)
    assert len(collection) == 12 and collection.skipped_shards == []
    assert collection.description == "world:seed=4,n=12,style=rich,res=32"
    for index in (0, 5, 11):
        record = collection.load(index)
        scene = collection.scene(index)
        assert record.caption == world.caption(scene, "rich")
        with Image.open(io.BytesIO(record.image)) as decoded:
            assert decoded.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), world.render(scene, 32))
    assert world.WorldCollection(3, style="short").load(1).caption == world.caption(world.World(0).scene(1), "short")
    with pytest.raises(IndexError):
        collection.load(12)


# --- detector ------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [64, 32])
@pytest.mark.parametrize("degrade", [False, True], ids=["clean", "blur1+noise4"])
def test_detector_agrees_with_ground_truth(resolution, degrade):
    agreement = _agreement(resolution, degrade)
    print(f"\n{resolution}px {'degraded' if degrade else 'clean'}: {agreement}")
    floor = 0.95 if degrade else 0.99
    assert all(value >= floor for value in agreement.values()), agreement


def test_detector_reports_geometry():
    scene = Scene(
        "black",
        (
            ObjectSpec("circle", "yellow", "large", "left", "top"),
            ObjectSpec("triangle", "cyan", "small", "right", "bottom"),
        ),
    )
    detection = detector.detect(world.render(scene, 64))
    big, small = detection.objects
    assert (big.colour, big.shape, small.colour, small.shape) == ("yellow", "circle", "cyan", "triangle")
    assert big.area > small.area
    assert abs(big.centroid[0] - 0.2 * 64) < 1 and abs(big.centroid[1] - 0.2 * 64) < 1
    x0, y0, x1, y1 = big.bbox
    assert abs((x1 - x0) - 0.34 * 64) <= 2 and abs((y1 - y0) - 0.34 * 64) <= 2
    assert abs(big.area - np.pi * (0.17 * 64) ** 2) < 0.05 * big.area
    # A larger image (box-averaged internally) reports the same objects in its own pixels.
    large = detector.detect(world.render(scene, 256))
    summary = [(o.colour, o.shape, o.size, o.cell) for o in detection.objects]
    assert [(o.colour, o.shape, o.size, o.cell) for o in large.objects] == summary
    assert abs(large.objects[0].centroid[0] - 4 * big.centroid[0]) < 2


def test_blank_and_unknown_images():
    blank = detector.detect(np.full((48, 48, 3), 128, np.uint8))
    assert blank.objects == () and blank.background == "grey"
    tinted = detector.detect(np.full((48, 48, 3), (90, 60, 40), np.uint8))
    assert tinted.background == detector.UNKNOWN
    spec = world.single_object_prompts()[0].spec
    result = detector.score(blank, spec)
    assert result["colour"] is False and result["count"] is False and result["all"] is False
    assert result["size"] is None and result["relation"] is None and result["background"] is None


def test_score_is_not_vacuous():
    blue_square = Scene("grey", (ObjectSpec("square", "blue", "large", "centre", "middle"),))
    red_circle = next(p for p in world.single_object_prompts() if p.text == "a red circle")
    result = detector.score(detector.detect(world.render(blue_square)), red_circle.spec)
    assert result["colour"] is False and result["shape"] is False and result["colour_shape"] is False
    assert result["count"] is True and result["all"] is False and result["position"] is None

    # Right colour and shape, but on different objects: colour_shape is wrong.
    two = Scene(
        "grey",
        (ObjectSpec("square", "red", "small", "left", "top"), ObjectSpec("circle", "blue", "small", "right", "bottom")),
    )
    result = detector.score(detector.detect(world.render(two)), red_circle.spec)
    assert result["colour_shape"] is False and result["count"] is False

    # Two objects for a one-object prompt: the object is right, the count is not.
    two = Scene(
        "white",
        (ObjectSpec("circle", "red", "large", "left", "top"), ObjectSpec("square", "blue", "small", "right", "bottom")),
    )
    result = detector.score(detector.detect(world.render(two)), red_circle.spec)
    assert result["colour_shape"] is True and result["count"] is False and result["all"] is False

    # The relation is checked: the same image fails the swapped relation.
    spec = world.prompt_spec(two, "rich")
    assert spec.relation == "to the left of" and detector.score(detector.detect(world.render(two)), spec)["all"]
    swapped = world.PromptSpec(spec.objects, spec.background, "to the right of")
    result = detector.score(detector.detect(world.render(two)), swapped)
    assert result["relation"] is False and result["colour_shape"] is True and result["all"] is False
    # Objects are matched by colour+shape, not by order: listing them the other way round with
    # the inverse relation is still right.
    reordered = world.PromptSpec((spec.objects[1], world.ObjectConstraint("circle", "red", "large")), "white", "below")
    assert detector.score(detector.detect(world.render(two)), reordered)["all"] is True


def test_accuracy_averages_only_constrained_items():
    prompts = world.single_object_prompts()[:4]
    scene_of = {  # the first two rendered as asked, the others in the wrong colour
        p.text: Scene(
            "grey",
            (
                ObjectSpec(
                    p.spec.objects[0].shape, p.spec.objects[0].colour if i < 2 else "green", "large", "centre", "middle"
                ),
            ),
        )
        for i, p in enumerate(prompts)
    }
    images = [world.render(scene_of[p.text]) for p in prompts]
    result = detector.accuracy(images, [p.spec for p in prompts])
    assert result["n"] == 4 and result["shape"] == 1.0 and result["colour"] == 0.5 and result["count"] == 1.0
    assert np.isnan(result["size"]) and np.isnan(result["relation"])


def test_world_is_a_preparation_input_form():
    from koala_jax.data.ingest import open_collection

    collection = open_collection("world:40:mixed:3")
    assert len(collection) == 40 and collection.description == "world:seed=3,n=40,style=mixed,res=64"
    styles = {collection.caption_style(i) for i in range(40)}
    assert styles == {"short", "rich"}
    for i in range(40):
        record = collection.load(i)
        assert record.caption == world.caption(collection.scene(i), collection.caption_style(i))


@pytest.mark.parametrize("spec", ["world:", "world:0", "world:ten", "world:5:long", "world:5:rich:x", "world:1:2:3:4"])
def test_bad_world_specs_are_one_clear_error(spec):
    from koala_jax.data.ingest import open_collection
    from koala_jax.errors import DataError

    with pytest.raises(DataError, match="world"):
        open_collection(spec)


def test_world_words_are_single_tokens():
    """The tiny world's tokenizer keeps every vocabulary word whole (any other text falls back to bytes)."""
    from koala_jax.pipelines.tiny import _tiny_tokenizer

    tokenizer = _tiny_tokenizer("!", world.vocabulary())
    text = world.caption(world.scene_at(0, 5), "rich")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[1:-1]
    assert [t.removesuffix("</w>") for t in tokens] == world.words(text)
    assert len(tokenizer("a koala").input_ids) == 2 + 1 + len("koala")  # bos, "a", k-o-a-l-a, eos
