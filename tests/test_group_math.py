"""GRPO and RLOO advantages against values computed by hand."""

import math

import pytest
import torch

from alignment.algorithms.group import grpo_advantages, rloo_advantages


def test_grpo_advantages_by_hand():
    # two prompts x three completions
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, sample std 1 -> (-1, 0, 1) / (1 + eps); group 2: all equal -> 0 (no signal)
    adv = grpo_advantages(scores, group_size=3)
    assert adv.tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    # Dr. GRPO: centred only
    assert grpo_advantages(scores, 3, scale=False).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def test_grpo_scaling_by_hand_with_a_wider_group():
    scores = torch.tensor([0.0, 4.0])
    # mean 2, sample std sqrt(8) = 2.828...
    adv = grpo_advantages(scores, 2)
    assert adv.tolist() == pytest.approx([-2 / (math.sqrt(8) + 1e-4), 2 / (math.sqrt(8) + 1e-4)])


def test_rloo_leave_one_out_baseline_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # group 1: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5
    # group 2: 0 - 1.5 = -1.5; 0 - 1.5 = -1.5; 3 - 0 = 3
    assert rloo_advantages(scores, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    # = G/(G-1) * (r - mean)
    centred = grpo_advantages(scores, 3, scale=False)
    assert rloo_advantages(scores, 3).tolist() == pytest.approx((centred * 3 / 2).tolist())


def test_group_shapes_are_checked():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of 3"):
        grpo_advantages(torch.zeros(4), 3)
