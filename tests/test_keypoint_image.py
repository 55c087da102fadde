"""InstantID's keypoint image: colours, dimmed limbs, canvas size, resizing, bad input."""

import numpy as np
import pytest

from fastface.errors import InputError
from fastface.keypoint_image import KEYPOINT_COLORS, control_tensor, draw_keypoints

# left eye, right eye, nose, mouth left, mouth right on a 200 x 160 canvas (width x height)
KPS = np.array([[60, 50], [140, 50], [100, 90], [70, 130], [130, 130]], dtype=np.float32)


def test_points_limbs_and_background():
    image = draw_keypoints(KPS, (200, 160))
    assert image.shape == (160, 200, 3) and image.dtype == np.uint8
    for (x, y), color in zip(KPS.astype(int), KEYPOINT_COLORS):
        assert tuple(image[y, x]) == color  # filled circle of radius 10, full colour
        assert tuple(image[y, x + 9]) == color and tuple(image[y, x + 12]) != color
    # the limb from the left eye to the nose, well outside both circles: the eye's colour at 60 %
    mid = ((KPS[0] + KPS[2]) / 2).astype(int)
    assert tuple(image[mid[1], mid[0]]) == (153, 0, 0)
    # limbs are 2·4 px wide ellipses: 6 px across the limb it is background again
    direction = (KPS[0] - KPS[2]) / np.linalg.norm(KPS[0] - KPS[2])
    off = (mid + 6 * np.array([-direction[1], direction[0]])).astype(int)
    assert tuple(image[off[1], off[0]]) == (0, 0, 0)
    assert tuple(image[5, 5]) == (0, 0, 0) and tuple(image[155, 195]) == (0, 0, 0)
    assert set(np.unique(image)) <= {0, 153, 255}


def test_control_tensor_is_resized_and_in_unit_range():
    image = draw_keypoints(KPS, (200, 160))
    tensor = control_tensor(image, 64, 80)
    assert tuple(tensor.shape) == (1, 3, 64, 80)
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0 and float(tensor.max()) > 0.9
    same = control_tensor(image, 160, 200)  # no resize: the drawing itself, scaled to [0, 1]
    np.testing.assert_allclose(same[0].permute(1, 2, 0).numpy(), image / 255.0, atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((4, 2)), np.full((5, 2), np.nan)])
def test_bad_keypoints_are_a_clear_error(bad):
    with pytest.raises(InputError, match="five finite"):
        draw_keypoints(bad, (64, 64))
    with pytest.raises(InputError, match="positive size"):
        draw_keypoints(KPS, (0, 64))
