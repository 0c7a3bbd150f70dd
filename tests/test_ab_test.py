"""``evaluate.ab_test`` on two different top-k lists, every number worked out by hand."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest

from recsys.evaluate import ab_test

# 4 users; item 9 and 8 are never relevant
RELEVANT = [np.array([1]), np.array([2, 3]), np.array([4]), np.array([5, 6])]
A = np.array([[1, 9], [2, 9], [9, 8], [5, 6]])  # recall@2: 1, 1/2, 0, 1    recall@1: 1, 1/2, 0, 1/2
B = np.array([[1, 9], [2, 3], [4, 9], [5, 9]])  # recall@2: 1, 1,   1, 1/2  recall@1: 1, 1/2, 1, 1/2


def test_ab_test_hand_worked_delta_and_interval():
    r = ab_test(A, B, SimpleNamespace(relevant=RELEVANT), [1, 2])
    # k = 2: differences B - A = [0, 1/2, 1, -1/2]: mean 1/4; deviations [-1/4, 1/4, 3/4, -3/4], squares sum to
    # 5/4, sample variance 5/12, standard error sqrt(5/12) / 2 = 0.3227486; half-width 1.96 * that = 0.6325873
    k2 = r["recall@2"]
    assert k2["a"] == pytest.approx(2.5 / 4) and k2["b"] == pytest.approx(3.5 / 4)
    assert k2["delta"] == pytest.approx(0.25)
    assert k2["ci95"] == pytest.approx([0.25 - 0.6325873, 0.25 + 0.6325873], abs=1e-6)
    assert (k2["b_better_users"], k2["a_better_users"]) == (2, 1)  # the tie (user 0) counts for neither
    # k = 1: differences [0, 0, 1, 0]: mean 1/4, sample variance 1/4, standard error 1/4, half-width 0.49
    k1 = r["recall@1"]
    assert (k1["a"], k1["b"], k1["delta"]) == pytest.approx((0.5, 0.75, 0.25))
    assert k1["ci95"] == pytest.approx([0.25 - 0.49, 0.25 + 0.49], abs=1e-9)
    assert (k1["b_better_users"], k1["a_better_users"]) == (1, 0)
    # the same interval from the standard library
    d = [0, 0.5, 1, -0.5]
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    assert k2["ci95"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half], abs=1e-12)


def test_ab_test_is_antisymmetric_and_deterministic():
    es = SimpleNamespace(relevant=RELEVANT)
    ab, ba = ab_test(A, B, es, [2])["recall@2"], ab_test(B, A, es, [2])["recall@2"]
    assert ba["delta"] == -ab["delta"] and ba["ci95"] == pytest.approx([-ab["ci95"][1], -ab["ci95"][0]])
    assert (ba["a_better_users"], ba["b_better_users"]) == (ab["b_better_users"], ab["a_better_users"])
    assert ab_test(A, B, es, [2]) == ab_test(A, B, es, [2])  # no resampling: no seed to depend on


def test_ab_test_one_user_has_no_interval():
    r = ab_test(A[:1], B[2:3], SimpleNamespace(relevant=RELEVANT[:1]), [2])["recall@2"]
    assert r["delta"] == -1.0 and all(math.isnan(x) for x in r["ci95"])
