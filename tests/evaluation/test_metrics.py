"""Metrics, dasymetric rescaling and the weak-supervision loss on hand-computed examples."""

import math

import numpy as np
import pytest
import torch

from popcorn.evaluation.dasymetric import block_sum, capped_rescale, dasymetric_rescale, region_sums
from popcorn.evaluation.metrics import format_table, mae, r2_score, regression_metrics, rmse
from popcorn.losses import region_log_l1, sum_by_region


def test_metrics_hand_example() -> None:
    true = [1.0, 2.0, 3.0, 4.0]
    pred = [1.0, 3.0, 3.0, 2.0]
    # residuals 0, -1, 0, 2 ; mean true 2.5 ; ss_tot = 2.25+0.25+0.25+2.25 = 5 ; ss_res = 5
    assert r2_score(pred, true) == pytest.approx(0.0)
    assert mae(pred, true) == pytest.approx(0.75)
    assert rmse(pred, true) == pytest.approx(math.sqrt(5 / 4))
    m = regression_metrics(pred, true)
    assert m["total_pred"] == 9 and m["total_true"] == 10 and m["units"] == 4
    assert r2_score(true, true) == 1.0
    assert "| a | 0.000 | 0.75 |" in format_table({"a": m})


def test_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="3 values"):
        r2_score([1, 2, 3], [1, 2])


def test_region_log_l1_hand_example() -> None:
    sums = torch.tensor([np.e - 1, 0.0])
    counts = torch.tensor([0.0, np.e**2 - 1])
    # |log1p(0) - log1p(e-1)| = 1 ; |log1p(e^2-1) - 0| = 2 ; mean 1.5
    assert region_log_l1(sums, counts).item() == pytest.approx(1.5, abs=1e-6)


def test_sum_by_region_averages_the_views_of_one_region() -> None:
    sums, counts = sum_by_region(
        torch.tensor([1.0, 2.0, 5.0]), torch.tensor([7, 3, 7]), torch.tensor([10.0, 4.0, 10.0])
    )
    assert sums.tolist() == [2.0, 3.0]  # ids sorted: 3, 7; region 7's two seasons averaged
    assert counts.tolist() == [4.0, 10.0]


def test_dasymetric_sums_equal_counts_exactly() -> None:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.array([[1, 1, 2, 2, 3, 0]]), 4, axis=0)
    values = rng.random(ids.shape).astype(np.float32)
    values[:, 4] = 0  # region 3 has no signal -> spread evenly
    out, scale = dasymetric_rescale(values, ids, {1: 100, 2: 10, 3: 8})
    sums = region_sums(out, ids)
    assert sums[1] == pytest.approx(100) and sums[2] == pytest.approx(10) and sums[3] == pytest.approx(8)
    assert np.allclose(out[:, 4], 2.0)
    assert (out[:, 5] == 0).all()
    assert math.isnan(scale[3]) and scale[1] == pytest.approx(100 / values[ids == 1].sum())


def test_capped_rescale_hand_example() -> None:
    ids = np.array([[1, 1, 2, 2, 3, 3, 0]])
    values = np.array([[1.0, 3.0, 2.0, 2.0, 0.0, 0.0, 5.0]])
    prior = np.array([[1.0, 0.0, 1.0, 3.0, 0.0, 0.0, 9.0]])
    counts = {1: 6.0, 2: 40.0, 3: 4.0}
    # overall factor: 50 people / 8 mapped = 6.25; cap 0.4 -> each factor at most 2.5
    out = capped_rescale(values, ids, counts, prior, cap=0.4)
    # region 1: factor 1.5 <= 2.5 -> the paper's rescaling
    assert out[0, :2] == pytest.approx([1.5, 4.5])
    # region 2: factor 10 -> map x 2.5 (10 people), the other 30 by the prior (1:3)
    assert out[0, 2:4] == pytest.approx([5.0 + 7.5, 5.0 + 22.5])
    # region 3: nothing in the map or the prior -> evenly; outside every region -> 0
    assert out[0, 4:] == pytest.approx([2.0, 2.0, 0.0])
    assert region_sums(out, ids)[1:] == pytest.approx([6.0, 40.0, 4.0])
    # cap 1: the map brought to the census total (x 6.25), then each region's shortfall evenly
    even = capped_rescale(values, ids, counts, np.ones_like(values), cap=1.0)
    assert even[0, :2] == pytest.approx([1.5, 4.5])  # factor 1.5 < 6.25: scaled down to the count
    assert even[0, 2:4] == pytest.approx([12.5 + 7.5, 12.5 + 7.5])
    # no cap = the paper's rescaling
    paper, _ = dasymetric_rescale(values, ids, counts)
    assert capped_rescale(values, ids, counts, prior, cap=math.inf) == pytest.approx(paper)
    nobody = {1: 0.0, 2: 0.0, 3: 0.0}  # overall factor 0: no NaN, nobody anywhere
    for cap in (1.0, math.inf):
        assert (capped_rescale(values, ids, nobody, prior, cap=cap) == 0).all()
    with pytest.raises(ValueError, match="cap must be > 0"):
        capped_rescale(values, ids, counts, prior, cap=0.0)


def test_block_sum_to_1ha() -> None:
    a = np.arange(400, dtype=np.float32).reshape(20, 20)
    b = block_sum(a, 10)
    assert b.shape == (2, 2)
    assert b[0, 1] == a[:10, 10:].sum()
    with pytest.raises(ValueError, match="multiple of 10"):
        block_sum(np.zeros((15, 20)), 10)
