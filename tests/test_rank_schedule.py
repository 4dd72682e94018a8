"""r(t), the rank mask and the mean mask against the formula of REFERENCE §1 computed in plain Python."""

import math

import pytest
import torch

from networks.tlora_layer import active_rank_count, mean_rank_mask, rank_mask


def formula(t, rank, min_rank, power, T=1000):
    return math.floor(((T - t) / T) ** power * (rank - min_rank)) + min_rank


@pytest.mark.parametrize("rank,min_rank,power", [(64, 32, 1.0), (64, 16, 1.0), (32, 1, 2.0), (8, 0, 0.5), (7, 3, 1.3), (128, 64, 3.0), (4, 4, 1.0)])
def test_active_rank_count_matches_formula_for_every_t(rank, min_rank, power):
    t = torch.arange(1000)
    got = active_rank_count(t, rank, min_rank, power).tolist()
    expected = [formula(step, rank, min_rank, power) for step in range(1000)]
    assert got == expected


def test_reference_examples():
    # REFERENCE §1: R=64, r_min=32: t=999 -> 32, t=500 -> 48, t=0 -> 64
    assert active_rank_count(torch.tensor([999, 500, 0]), 64, 32).tolist() == [32, 48, 64]


def test_float_timesteps_and_scalars():
    # diffusers schedulers pass float timesteps; sample generation passes a Python number
    assert active_rank_count(torch.tensor([979.5]), 64, 32).item() == formula(979.5, 64, 32, 1.0)
    assert active_rank_count(250, 64, 32).item() == formula(250, 64, 32, 1.0)
    assert active_rank_count(torch.tensor(250), 64, 32).shape == (1,)


def test_rank_mask_keeps_lowest_indices_per_sample():
    counts = torch.tensor([3, 8, 5])
    mask = rank_mask(counts, 8)
    assert mask.shape == (3, 8)
    for row, count in zip(mask.tolist(), counts.tolist()):
        assert row == [1.0] * count + [0.0] * (8 - count)


@pytest.mark.parametrize("rank,min_rank,power", [(64, 32, 1.0), (16, 4, 2.0)])
def test_mean_mask_is_fraction_of_timesteps_with_rank_active(rank, min_rank, power):
    mean = mean_rank_mask(rank, min_rank, power)
    for i in range(rank):
        active = sum(1 for t in range(1000) if formula(t, rank, min_rank, power) > i)
        assert mean[i].item() == pytest.approx(active / 1000, abs=1e-12)
