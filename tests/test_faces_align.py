import numpy as np
import pytest

from fastface.errors import InputError
from fastface.faces.align import (
    ARCFACE_TEMPLATE,
    align_crop,
    invert_affine,
    similarity_transform,
    template_for,
    transform_points,
)


def _random_similarity(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(-np.pi / 3, np.pi / 3)
    scale = rng.uniform(0.5, 3.0)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rot, rng.uniform(-200, 400, size=(2, 1))])


@pytest.mark.parametrize("seed", range(5))
def test_planted_keypoints_map_back_to_template(seed):
    rng = np.random.default_rng(seed)
    to_image = _random_similarity(rng)
    planted = transform_points(to_image, ARCFACE_TEMPLATE + rng.normal(0, 0.15, size=(5, 2)))
    matrix = similarity_transform(planted, ARCFACE_TEMPLATE)
    error = np.linalg.norm(transform_points(matrix, planted) - ARCFACE_TEMPLATE, axis=1)
    assert error.max() < 0.5
    exact = similarity_transform(transform_points(to_image, ARCFACE_TEMPLATE), ARCFACE_TEMPLATE)
    assert np.allclose(exact, invert_affine(to_image), atol=1e-6)


def test_similarity_transform_never_reflects():
    mirrored = ARCFACE_TEMPLATE * np.array([-1.0, 1.0])
    matrix = similarity_transform(mirrored, ARCFACE_TEMPLATE)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_template_for_224_is_twice_112_and_128_is_shifted():
    assert np.allclose(template_for(224), 2 * ARCFACE_TEMPLATE, atol=1e-4)
    assert np.allclose(template_for(112), ARCFACE_TEMPLATE)
    assert np.allclose(template_for(128)[:, 0], ARCFACE_TEMPLATE[:, 0] + 8.0, atol=1e-4)


@pytest.mark.parametrize("size", [112, 224])
def test_warped_crop_puts_a_dot_where_the_template_says(size):
    rng = np.random.default_rng(size)
    to_image = _random_similarity(rng)
    to_image[:, 2] = [300, 250]
    keypoints = transform_points(to_image, ARCFACE_TEMPLATE)
    image = np.zeros((700, 700, 3), np.uint8)
    nose = np.round(keypoints[2]).astype(int)
    image[nose[1] - 2:nose[1] + 3, nose[0] - 2:nose[0] + 3] = 255
    crop = align_crop(image, keypoints, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    ys, xs = np.nonzero(crop[:, :, 0] > 60)
    weights = crop[ys, xs, 0].astype(float)
    centre = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)])
    expected = transform_points(similarity_transform(keypoints, template_for(size)), nose[None])[0]
    assert np.linalg.norm(centre - expected) < 1.0
    assert np.linalg.norm(expected - template_for(size)[2]) < size / 112 * 1.0


def test_bad_keypoints_are_an_input_error():
    with pytest.raises(InputError, match="five keypoints"):
        align_crop(np.zeros((10, 10, 3), np.uint8), np.zeros((4, 2)))
