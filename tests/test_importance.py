"""The layer-importance math, pinned on hand-made tensors."""

import math

import pytest
import torch

from shortgpt_deploy.importance import (
    METRICS,
    LayerStats,
    angular_distance,
    block_influence,
    relative_magnitude,
    token_cosine,
)
from shortgpt_deploy.recipe import FORWARD_METRICS, MetricName


def test_identical_input_and_output_have_zero_influence():
    x = torch.randn(2, 5, 8)
    assert block_influence(x, x.clone()) == pytest.approx(0.0, abs=1e-6)


def test_opposite_output_has_influence_two():
    x = torch.randn(2, 5, 8)
    assert block_influence(x, -x) == pytest.approx(2.0, abs=1e-6)


def test_orthogonal_output_has_influence_one():
    x = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    y = torch.tensor([[[0.0, 2.0], [-5.0, 0.0]]])
    assert block_influence(x, y) == pytest.approx(1.0, abs=1e-6)


def test_influence_is_the_mean_over_tokens_of_one_minus_cosine():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # cos = 1, 0, 1/sqrt(2)
    expected = 1 - (1 + 0 + 1 / math.sqrt(2)) / 3
    assert block_influence(x, y) == pytest.approx(expected, abs=1e-6)


def test_scale_does_not_change_influence():
    x, y = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    assert block_influence(x, y) == pytest.approx(block_influence(7 * x, 0.01 * y), abs=1e-5)


def test_padded_tokens_change_nothing():
    x, y = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    garbage_y = y.clone()
    garbage_y[1, 3:] = -x[1, 3:] * 1e6  # padding positions may hold anything
    assert block_influence(x, y, mask) == pytest.approx(block_influence(x, garbage_y, mask), abs=1e-9)
    real = torch.cat([x[0], x[1, :3]]), torch.cat([y[0], y[1, :3]])
    assert block_influence(x, y, mask) == pytest.approx(block_influence(*real), abs=1e-6)
    assert block_influence(x, y, mask) != pytest.approx(block_influence(x, garbage_y), abs=1e-3)


def test_cosine_is_computed_in_float32_even_for_half_inputs():
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert token_cosine(x, x).dtype == torch.float32


def test_relative_magnitude():
    x = torch.tensor([[[3.0, 0.0]]])
    out = torch.tensor([[[3.0, 4.0]]])  # f(x) = (0, 4): ‖f‖ = 4, ‖x + f‖ = 5
    assert relative_magnitude(x, out) == pytest.approx(0.8)
    assert relative_magnitude(x, x) == pytest.approx(0.0)


def test_angular_distance():
    x = torch.tensor([[[1.0, 0.0]]])
    assert angular_distance(x, x) == pytest.approx(0.0, abs=1e-3)
    assert angular_distance(x, -x) == pytest.approx(1.0, abs=1e-6)
    assert angular_distance(x, torch.tensor([[[0.0, 1.0]]])) == pytest.approx(0.5, abs=1e-6)


def test_fixed_orders():
    stats = LayerStats(num_layers=4)
    order = lambda s: sorted(range(4), key=lambda i: (s[i], i))  # noqa: E731
    assert order(METRICS["sequential"](stats)) == [0, 1, 2, 3]
    assert order(METRICS["reverse"](stats)) == [3, 2, 1, 0]


def test_metric_registry_matches_recipe_literal():
    assert set(MetricName.__args__) == set(METRICS)
    assert set(FORWARD_METRICS) <= set(METRICS)
