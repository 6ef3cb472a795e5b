"""DC's own evaluation augmentation (``--augment dc``): one op per image, the reference's parameters; a
data-parallel share of a batch augmented as in the whole batch (DC and DSA)."""

from __future__ import annotations

import pytest
import torch

from distill.augment import (
    DC_AUGMENT,
    DEFAULT_STRATEGY,
    DIGITS_STRATEGY,
    BatchRows,
    DCAugParams,
    augment_for_training,
    check_strategy,
    dc_augment,
)
from distill.errors import DistillError


def _digit_batch(n: int = 8) -> torch.Tensor:
    x = torch.full((n, 1, 28, 28), -0.4)
    x[:, :, 8:20, 12:16] = 2.8  # a bar in the middle of a dark field
    return x


def test_each_image_gets_one_op_and_the_shape_is_kept():
    x = _digit_batch(64)
    out = dc_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    changed = [(out[i] != x[i]).any().item() for i in range(len(x))]
    assert sum(changed) >= 48  # crop by 0 in both axes, a 0-degree turn or a 1.0 scale leave an image as it was
    assert torch.equal(x, _digit_batch(64))  # the input is not modified in place


def test_crop_is_an_integer_shift_filled_with_the_mean():
    x = _digit_batch(16)
    out = dc_augment(x, torch.Generator().manual_seed(1), strategy="crop")
    mean = float(x.mean())
    for i in range(len(x)):
        bar = (out[i, 0] == 2.8).nonzero()
        assert len(bar) == 12 * 4  # the whole bar survives a shift of at most 4 pixels
        rows, cols = bar[:, 0], bar[:, 1]
        assert -3 <= int(rows.min()) - 8 <= 4 and -3 <= int(cols.min()) - 12 <= 4  # pad 4, offset in [0, 8)
        allowed = torch.tensor([-0.4, 2.8, mean])
        assert torch.isclose(out[i].reshape(-1, 1), allowed, atol=1e-5).any(dim=1).all()  # pad = the batch mean


def test_rotate_turns_by_at_most_45_degrees_and_keeps_the_mass_near():
    x = _digit_batch(16)
    out = dc_augment(x, torch.Generator().manual_seed(2), strategy="rotate")
    for i in range(len(x)):
        bright = out[i, 0] > 1.2
        ys, xs = bright.nonzero(as_tuple=True)
        assert abs(float(ys.float().mean()) - 13.5) < 1.5 and abs(float(xs.float().mean()) - 13.5) < 1.5
        assert 30 <= int(bright.sum()) <= 70  # a 12x4 bar, turned (cubic spline, so edges vary)


def test_scale_resizes_each_axis_within_20_percent():
    x = _digit_batch(16)
    out = dc_augment(x, torch.Generator().manual_seed(3), strategy="scale")
    for i in range(len(x)):
        ys, xs = (out[i, 0] == 2.8).nonzero(as_tuple=True)
        height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert 9 <= height <= 15 and 3 <= width <= 5


def test_same_generator_same_result_and_noise_is_small():
    x = _digit_batch()
    a = dc_augment(x, torch.Generator().manual_seed(4))
    b = dc_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    noisy = dc_augment(x, torch.Generator().manual_seed(5), strategy="noise")
    assert 0 < float((noisy - x).abs().max()) < 10 * DCAugParams().noise


def test_strategy_names():
    for good in ("auto", "none", DC_AUGMENT, "crop_scale_rotate", "color_crop_cutout_flip_scale_rotate"):
        check_strategy(good)
    for bad in ("", "bogus", "crop_bogus", "crop__scale_"):
        with pytest.raises(DistillError, match="unknown augmentation"):
            check_strategy(bad)
    x = _digit_batch()
    assert augment_for_training(x, DC_AUGMENT, torch.Generator().manual_seed(0)).shape == x.shape


@pytest.mark.parametrize("strategy", [DC_AUGMENT, DIGITS_STRATEGY, DEFAULT_STRATEGY])
def test_a_share_of_a_batch_is_augmented_as_in_the_whole_batch(strategy):
    """Data parallelism: a process augmenting rows rank::world of a batch gets exactly those rows of the
    one-process result (also an empty share), and its generator ends where one process's does."""
    x = torch.randn(9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        whole_gen = torch.Generator().manual_seed(seed)
        whole = augment_for_training(x, strategy, whole_gen)
        for world in (2, 3, 12):
            for rank in range(world):
                gen = torch.Generator().manual_seed(seed)
                rows = BatchRows.strided(len(x), rank, world).index
                assert torch.equal(augment_for_training(x, strategy, gen, rows), whole[rows])
                assert torch.equal(gen.get_state(), whole_gen.get_state())
