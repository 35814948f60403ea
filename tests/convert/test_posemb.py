"""Position-embedding resizing: non-square grids, class token kept, originals unchanged,
interpolation exact on linear functions (so smooth), and the resized model runs."""
import numpy as np
import pytest

from vlmjax.convert import load_pretrained, resize_posemb
from vlmjax.convert.posemb import resize_image_posemb

WIDTH = 4


def grid_posemb(h, w, fn, class_token=None):
    """[1, (cls) + h*w, WIDTH] with value fn(y, x, channel)."""
    y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(WIDTH), indexing="ij")
    patches = fn(y, x, c).reshape(1, h * w, WIDTH).astype(np.float32)
    if class_token is None:
        return patches
    return np.concatenate([np.full((1, 1, WIDTH), class_token, np.float32), patches], axis=1)


def test_upsampling_non_square_keeps_originals_and_class_token():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 5, WIDTH))
    posemb = grid_posemb(3, 5, lambda y, x, c: values[y, x, c], class_token=7.5)
    out = resize_posemb(posemb, (5, 9), num_prefix=1, old_grid=(3, 5))
    assert out.shape == (1, 1 + 5 * 9, WIDTH) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], 7.5)  # class token untouched
    grid = out[0, 1:].reshape(5, 9, WIDTH)
    # (3, 5) -> (5, 9) = ((3-1)*2+1, (5-1)*2+1): every original sits at an even position.
    np.testing.assert_allclose(grid[::2, ::2], values, rtol=0, atol=1e-6)
    # The positions in between are the means of their neighbours.
    np.testing.assert_allclose(grid[1::2, ::2], (values[:-1] + values[1:]) / 2, atol=1e-6)
    np.testing.assert_allclose(grid[::2, 1::2], (values[:, :-1] + values[:, 1:]) / 2, atol=1e-6)


@pytest.mark.parametrize("old,new", [((3, 5), (7, 4)), ((4, 6), (2, 3)), ((5, 5), (6, 11))])
def test_interpolation_is_exact_on_linear_functions(old, new):
    """Bilinear interpolation reproduces any affine function of the position: no ringing,
    overshoot or seams, whatever the up/down factors per axis."""
    slope_y, slope_x, offset = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.3, 1.0, -1.0, 0.0]), 2.0
    affine = lambda y, x, c: slope_y[c] * y + slope_x[c] * x + offset  # noqa: E731
    out = resize_posemb(grid_posemb(*old, affine), new, old_grid=old)
    y = np.arange(new[0]) * (old[0] - 1) / (new[0] - 1)  # corners aligned
    x = np.arange(new[1]) * (old[1] - 1) / (new[1] - 1)
    want = grid_posemb(*new, lambda i, j, c: slope_y[c] * y[i] + slope_x[c] * x[j] + offset)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_values_stay_within_their_neighbourhood():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(4, 3, WIDTH))
    out = resize_posemb(grid_posemb(4, 3, lambda y, x, c: values[y, x, c]), (10, 7),
                        old_grid=(4, 3)).reshape(10, 7, WIDTH)
    for i in range(10):
        for j in range(7):
            y, x = i * 3 / 9, j * 2 / 6
            rows = slice(int(np.floor(y)), int(np.ceil(y)) + 1)
            cell = values[rows, int(np.floor(x)):int(np.ceil(x)) + 1]
            assert np.all(out[i, j] >= cell.min((0, 1)) - 1e-6)
            assert np.all(out[i, j] <= cell.max((0, 1)) + 1e-6)


def test_same_grid_is_identity_and_bad_grids_are_named():
    posemb = grid_posemb(4, 4, lambda y, x, c: y * 10.0 + x + c)
    np.testing.assert_array_equal(resize_posemb(posemb, (4, 4)), posemb)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_posemb(posemb[:, :15], (4, 4))
    with pytest.raises(ValueError, match=r"grid \(3, 5\) has 15 positions"):
        resize_posemb(posemb, (6, 6), old_grid=(3, 5))
    with pytest.raises(ValueError, match="not a pair of positive sizes"):
        resize_posemb(posemb, (0, 4))
    config = {"image": {"patch_size": 6, "pool": "cls"}}
    with pytest.raises(ValueError, match="multiples of the patch size 6"):
        resize_image_posemb({"image_tower/posemb/pos_embedding": posemb}, config, (24, 24),
                            (25, 30))


def test_load_pretrained_resizes_for_a_non_square_resolution(clip_hf, images):
    model, params, _ = load_pretrained(clip_hf[0])
    bigger, bigger_params, _ = load_pretrained(clip_hf[0], image_size=(54, 42))
    original = params["image_tower"]["posemb"]["pos_embedding"]
    resized = bigger_params["image_tower"]["posemb"]["pos_embedding"]
    assert resized.shape == (1, 1 + 9 * 7, original.shape[-1])
    np.testing.assert_array_equal(resized[0, 0], original[0, 0])  # class token
    # 5x5 -> 9x7: rows land exactly every 2nd, columns at 0 and the last.
    grid = np.asarray(resized[0, 1:]).reshape(9, 7, -1)
    np.testing.assert_allclose(grid[::2, 0], np.asarray(original[0, 1:]).reshape(5, 5, -1)[:, 0],
                               atol=1e-6)
    tall = np.random.default_rng(3).normal(size=(2, 54, 42, 3)).astype(np.float32)
    z = bigger.apply({"params": bigger_params}, tall, method=bigger.encode_image)
    assert z.shape == (2, 20) and np.all(np.isfinite(z))
    with pytest.raises(Exception, match="pos_embedding"):  # the original fits only 30x30
        model.apply({"params": params}, tall, method=model.encode_image)
