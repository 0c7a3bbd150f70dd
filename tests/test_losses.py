"""Tests for recsys.train.losses: hand-worked values, masking, logQ, extra negatives, queue, SSL, chunked == plain."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.train.losses import (
    ItemEmbeddingQueue,
    feature_dropout,
    feature_dropout_ssl_loss,
    in_batch_softmax,
    in_batch_softmax_chunked,
    mixed_log_q,
)

torch.set_num_threads(1)

LOSSES = [in_batch_softmax, lambda *a, **k: in_batch_softmax_chunked(*a, chunk_size=1, **k)]
LOSS_IDS = ["plain", "chunked"]


def _lse(*xs: float) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


# q = [[1, 2], [2, 3]], c = [[0, 3], [1, 1]]
# all_pair_scores = q @ c.T = [[6, 3], [9, 5]]
Q2 = torch.tensor([[1.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
C2 = torch.tensor([[0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_two_by_two_hand_worked(loss_fn):
    # row 0: positive 6, negative 3 -> log(e^6 + e^3) - 6 = log(1 + e^-3) = 0.04858735
    # row 1: positive 5, negative 9 -> log(e^9 + e^5) - 5 = log(1 + e^4)  = 4.01814993
    expected = (math.log1p(math.exp(-3)) + math.log1p(math.exp(4))) / 2  # 2.03336864
    assert loss_fn(Q2, C2, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(2.03336864, rel=1e-6)
    # temperature 0.5 doubles every logit: [[12, 6], [18, 10]]
    expected_t = (math.log1p(math.exp(-6)) + math.log1p(math.exp(8))) / 2
    assert loss_fn(Q2, C2, temperature=0.5).item() == pytest.approx(expected_t, rel=1e-6)
    assert loss_fn(Q2, C2, temperature=torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(
        expected_t, rel=1e-6
    )
    per_row = loss_fn(Q2, C2, temperature=1.0, reduction="none")
    assert per_row.tolist() == pytest.approx([math.log1p(math.exp(-3)), math.log1p(math.exp(4))], rel=1e-6)
    assert loss_fn(Q2, C2, temperature=1.0, reduction="sum").item() == pytest.approx(2 * expected, rel=1e-6)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_three_by_three_hand_worked_with_masking_and_logq(loss_fn):
    # q = I (3x3), c = [[1, 0, 0], [2, 1, 0], [0, 0, 3]]
    # all_pair_scores = q @ c.T = c.T = [[1, 2, 0], [0, 1, 0], [0, 0, 3]]
    q = torch.eye(3, dtype=torch.float64)
    c = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    # items [7, 8, 7]: rows 0 and 2 hold the same item, so (0, 2) and (2, 0) are masked.
    items = torch.tensor([7, 8, 7])
    # row 0: logits [1, 2, -inf] -> lse(1, 2) - 1
    # row 1: logits [0, 1, 0]    -> lse(0, 1, 0) - 1
    # row 2: logits [-inf, 0, 3] -> lse(0, 3) - 3
    rows = [_lse(1, 2) - 1, _lse(0, 1, 0) - 1, _lse(0, 3) - 3]
    got = loss_fn(q, c, temperature=1.0, item_ids=items, reduction="none")
    assert got.tolist() == pytest.approx(rows, rel=1e-6)
    # logQ with log_q = [-1, -2, -0.5]: logits_ij = s_ij - log_q_j = s_ij + [1, 2, 0.5]_j
    # row 0: [2, 4, -inf]  row 1: [1, 3, 0.5]  row 2: [-inf, 2, 3.5]
    log_q = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    rows_q = [_lse(2, 4) - 2, _lse(1, 3, 0.5) - 3, _lse(2, 3.5) - 3.5]
    got = loss_fn(q, c, temperature=1.0, item_ids=items, log_q=log_q, reduction="none")
    assert got.tolist() == pytest.approx(rows_q, rel=1e-6)
    # correct_positive=False keeps the diagonal uncorrected: row 0 [1, 4, -inf], row 1 [1, 1, 0.5], row 2 [-inf, 2, 3]
    rows_np = [_lse(1, 4) - 1, _lse(1, 1, 0.5) - 1, _lse(2, 3) - 3]
    got = loss_fn(
        q, c, temperature=1.0, item_ids=items, log_q=log_q, correct_positive=False, reduction="none"
    )
    assert got.tolist() == pytest.approx(rows_np, rel=1e-6)
    # weights [1, 2, 1]: weighted mean = (r0 + 2 r1 + r2) / 4
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    got = loss_fn(q, c, temperature=1.0, item_ids=items, weights=w)
    assert got.item() == pytest.approx((rows[0] + 2 * rows[1] + rows[2]) / 4, rel=1e-6)
    got = loss_fn(q, c, temperature=1.0, item_ids=items, weights=w, reduction="sum")
    assert got.item() == pytest.approx(rows[0] + 2 * rows[1] + rows[2], rel=1e-6)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_duplicate_item_column_is_not_a_negative(loss_fn):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, generator=g, dtype=torch.float64)
    c = torch.randn(4, 5, generator=g, dtype=torch.float64)
    items = torch.tensor([10, 11, 10, 12])  # rows 0 and 2 share an item
    full = loss_fn(q, c, temperature=0.3, item_ids=items, reduction="none")
    # row 0 without column 2: the batch [0, 1, 3]
    keep = [0, 1, 3]
    ref0 = loss_fn(q[keep], c[keep], temperature=0.3, reduction="none")[0]
    # row 2 without column 0: the batch [2, 1, 3]
    keep = [2, 1, 3]
    ref2 = loss_fn(q[keep], c[keep], temperature=0.3, reduction="none")[0]
    assert full[0].item() == pytest.approx(ref0.item(), rel=1e-9)
    assert full[2].item() == pytest.approx(ref2.item(), rel=1e-9)
    unmasked = loss_fn(q, c, temperature=0.3, reduction="none")
    assert unmasked[0].item() > full[0].item()  # the duplicate was acting as a (hard) negative
    # rows 1 and 3 have no duplicate: unchanged
    assert full[[1, 3]].tolist() == pytest.approx(unmasked[[1, 3]].tolist(), rel=1e-12)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_same_user_positives_are_not_negatives(loss_fn):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    users = torch.tensor([5, 6, 6, 7])  # rows 1 and 2: the same user's two positives
    full = loss_fn(q, c, temperature=1.0, user_ids=users, reduction="none")
    ref1 = loss_fn(q[[1, 0, 3]], c[[1, 0, 3]], temperature=1.0, reduction="none")[0]
    ref2 = loss_fn(q[[2, 0, 3]], c[[2, 0, 3]], temperature=1.0, reduction="none")[0]
    assert full[1].item() == pytest.approx(ref1.item(), rel=1e-9)
    assert full[2].item() == pytest.approx(ref2.item(), rel=1e-9)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_diagonal_is_never_masked(loss_fn):
    # every row the same item and the same user: only the positive is left, loss 0 (and finite)
    q = torch.randn(3, 4, dtype=torch.float64)
    c = torch.randn(3, 4, dtype=torch.float64)
    same = torch.tensor([1, 1, 1])
    got = loss_fn(q, c, temperature=0.1, item_ids=same, user_ids=same, reduction="none")
    assert got.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_logq_lowers_a_popular_negatives_logit(loss_fn):
    # scores [[6, 3], [9, 5]]; make item 1 popular (log_q = log 0.8) vs rare (log 0.1)
    rare = torch.log(torch.tensor([0.1, 0.1], dtype=torch.float64))
    popular = torch.log(torch.tensor([0.1, 0.8], dtype=torch.float64))
    loss_rare = loss_fn(Q2, C2, temperature=1.0, log_q=rare, reduction="none")
    loss_pop = loss_fn(Q2, C2, temperature=1.0, log_q=popular, reduction="none")
    # row 0's negative (column 1) became popular: its logit drops by log 8, row 0's loss drops
    assert loss_pop[0].item() < loss_rare[0].item()
    # row 0: logits [6 - log .1, 3 - log .8] -> log(1 + e^(3 - log .8 - 6 + log .1))
    assert loss_pop[0].item() == pytest.approx(math.log1p(math.exp(-3 + math.log(0.1 / 0.8))), rel=1e-6)
    # with equal log_q everywhere and the positive corrected too, logQ is a no-op
    assert loss_rare.tolist() == pytest.approx(
        loss_fn(Q2, C2, temperature=1.0, reduction="none").tolist(), rel=1e-9
    )


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_correct_positive_false_leaves_positive_logit(loss_fn):
    log_q = torch.tensor([-2.0, -0.5], dtype=torch.float64)
    got = loss_fn(Q2, C2, temperature=1.0, log_q=log_q, correct_positive=False, reduction="none")
    # row 0: [6, 3 + 0.5] ; row 1: [9 + 2, 5]
    assert got.tolist() == pytest.approx([_lse(6, 3.5) - 6, _lse(11, 5) - 5], rel=1e-6)
    got = loss_fn(Q2, C2, temperature=1.0, log_q=log_q, correct_positive=True, reduction="none")
    # row 0: [6 + 2, 3.5] ; row 1: [11, 5.5]
    assert got.tolist() == pytest.approx([_lse(8, 3.5) - 8, _lse(11, 5.5) - 5.5], rel=1e-6)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_gradient_reaches_every_unmasked_negative_and_no_masked_one(loss_fn):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    items = torch.tensor([0, 1, 0, 2, 3])
    extra_items = torch.tensor([9, 0, 8])  # extra 1 is row 0's item
    per_row = loss_fn(
        q, c, temperature=0.5, item_ids=items, extra_c=extra, extra_item_ids=extra_items, reduction="none"
    )
    per_row[
        0
    ].backward()  # row 0 only: column j gets a gradient iff it is row 0's positive or unmasked negative
    c_norm = c.grad.norm(dim=1)
    assert (c_norm[[0, 1, 3, 4]] > 0).all()
    assert c_norm[2].item() == 0.0  # same item as row 0
    e_norm = extra.grad.norm(dim=1)
    assert (e_norm[[0, 2]] > 0).all()
    assert e_norm[1].item() == 0.0
    assert q.grad[0].norm() > 0 and q.grad[1:].abs().sum().item() == 0.0


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_mixed_negatives_add_hand_worked_terms(loss_fn):
    # scores [[6, 3], [9, 5]] plus one uniform extra e = [1, 0]: q @ e = [1, 2]
    extra = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    got = loss_fn(Q2, C2, temperature=1.0, extra_c=extra, reduction="none")
    assert got.tolist() == pytest.approx([_lse(6, 3, 1) - 6, _lse(9, 5, 2) - 5], rel=1e-6)
    base = loss_fn(Q2, C2, temperature=1.0, reduction="none")
    assert (got > base).all()
    # with logQ: in-batch log_q [-1, -2], uniform extra over 100 items -> extra_log_q = -log(100)
    log_q = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    got = loss_fn(
        Q2, C2, temperature=1.0, extra_c=extra, log_q=log_q, extra_log_q=-math.log(100), reduction="none"
    )
    l100 = math.log(100)
    assert got.tolist() == pytest.approx([_lse(7, 5, 1 + l100) - 7, _lse(10, 7, 2 + l100) - 7], rel=1e-6)


def test_mixed_log_q_hand_worked():
    # p = [0.5, 0.1], B = 2 batch draws, M = 2 uniform draws over N = 10 items:
    # q = (2 p + 2 / 10) / 4 = [(1 + 0.2) / 4, (0.2 + 0.2) / 4] = [0.3, 0.1]
    got = mixed_log_q(
        torch.log(torch.tensor([0.5, 0.1], dtype=torch.float64)), batch_size=2, n_uniform=2, n_items=10
    )
    assert got.exp().tolist() == pytest.approx([0.3, 0.1], rel=1e-9)
    pure = mixed_log_q(torch.tensor([-3.0]), batch_size=4, n_uniform=0, n_items=10)
    assert pure.item() == pytest.approx(-3.0, rel=1e-6)


def test_queue_ring_buffer_and_negatives_without_gradient():
    queue = ItemEmbeddingQueue(4, 2)
    emb, ids = queue.tensors()
    assert emb.shape == (0, 2) and ids.shape == (0,) and len(queue) == 0
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    queue.enqueue(src * 2, torch.tensor([1, 2, 3]), log_q=torch.tensor([-1.0, -2.0, -3.0]))
    queue.enqueue(
        torch.tensor([[5.0, 5.0], [6.0, 6.0]]), torch.tensor([4, 5]), log_q=torch.tensor([-4.0, -5.0])
    )
    emb, ids = queue.tensors()
    # capacity 4: item 4 went to slot 3, item 5 overwrote slot 0 (the oldest, item 1)
    assert ids.tolist() == [5, 2, 3, 4]
    assert emb.tolist() == [[6.0, 6.0], [0.0, 2.0], [2.0, 2.0], [5.0, 5.0]]
    assert queue.log_q().tolist() == [-5.0, -2.0, -3.0, -4.0]
    assert not emb.requires_grad
    with pytest.raises(ValueError, match="log_q"):
        queue.enqueue(torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        queue.enqueue(torch.zeros(1, 3), torch.tensor([0]), log_q=torch.zeros(1))
    # a batch bigger than the queue keeps its newest rows
    big = ItemEmbeddingQueue(2, 1)
    big.enqueue(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 2, 3]))
    assert big.tensors()[1].tolist() == [2, 3] and big.log_q() is None

    # as negatives: the loss goes up, the queue gets no gradient, a queued copy of a row's item is masked
    # (temperature 5 keeps every logit within +-2, so each extra term visibly raises the log-sum-exp)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(3, 2, generator=g).requires_grad_()
    c = torch.randn(3, 2, generator=g).requires_grad_()
    items = torch.tensor([2, 7, 8])
    base = in_batch_softmax(q, c, temperature=5.0, item_ids=items, reduction="none")
    with_q = in_batch_softmax(
        q, c, temperature=5.0, item_ids=items, extra_c=emb, extra_item_ids=ids, reduction="none"
    )
    assert (with_q > base + 1e-3).all()
    # row 0's item 2 sits in the queue (slot 1): masking it equals dropping it by hand
    manual = in_batch_softmax(q, c, temperature=5.0, item_ids=items, extra_c=emb[[0, 2, 3]], reduction="none")
    assert with_q[0].item() == pytest.approx(manual[0].item(), rel=1e-6)
    with_q.sum().backward()
    assert q.grad is not None and c.grad is not None and emb.grad is None


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_empty_queue_and_low_precision_queue_entries(loss_fn):
    # the first step: an empty queue (even with log_q) contributes nothing
    empty = ItemEmbeddingQueue(8, 2)
    emb, ids = empty.tensors()
    log_q = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    got = loss_fn(Q2, C2, temperature=1.0, item_ids=torch.tensor([0, 1]), log_q=log_q, extra_c=emb.double(),
                  extra_item_ids=ids, extra_log_q=torch.zeros(0, dtype=torch.float64))  # fmt: skip
    ref = loss_fn(Q2, C2, temperature=1.0, item_ids=torch.tensor([0, 1]), log_q=log_q)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    # entries stored in bf16 are promoted to the towers' dtype: e = [1, 0] is exact in bf16
    queue = ItemEmbeddingQueue(4, 2, dtype=torch.bfloat16)
    queue.enqueue(torch.tensor([[1.0, 0.0]]), torch.tensor([5]))
    emb, _ = queue.tensors()
    assert emb.dtype == torch.bfloat16
    got = loss_fn(Q2, C2, temperature=1.0, extra_c=emb, reduction="none")
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([_lse(6, 3, 1) - 6, _lse(9, 5, 2) - 5], rel=1e-6)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_learned_temperature_gets_the_analytic_gradient(loss_fn):
    # loss(t) = mean_i [lse_j(s_ij / t) - s_ii / t]; d/dt = mean_i [-(sum_j p_ij s_ij - s_ii) / t^2]
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss_fn(Q2, C2, temperature=t).backward()
    s = [[6.0, 3.0], [9.0, 5.0]]
    expected = 0.0
    for i in range(2):
        z = [s[i][j] / 2.0 for j in range(2)]
        p = [math.exp(v - _lse(*z)) for v in z]
        expected += -(sum(p[j] * s[i][j] for j in range(2)) - s[i][i]) / 4.0
    assert t.grad.item() == pytest.approx(expected / 2, rel=1e-6)


def _random_case(seed: int, b: int = 11, m: int = 5, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    return dict(
        q=torch.randn(b, d, **kw).requires_grad_(),
        c=torch.randn(b, d, **kw).requires_grad_(),
        temperature=(0.2 + torch.rand((), **kw)).requires_grad_(),
        item_ids=torch.randint(0, 6, (b,), generator=g),  # plenty of duplicates
        user_ids=torch.randint(0, 5, (b,), generator=g),
        log_q=(-5 * torch.rand(b, **kw)).requires_grad_(),
        extra_c=torch.randn(m, d, **kw).requires_grad_(),
        extra_item_ids=torch.randint(0, 8, (m,), generator=g),
        extra_log_q=(-5 * torch.rand(m, **kw)).requires_grad_(),
        weights=torch.rand(b, **kw),
    )


@pytest.mark.parametrize("correct_positive", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 11, 64])
def test_chunked_equals_plain_values_and_gradients(correct_positive, chunk_size):
    case = _random_case(3)
    grads = ["q", "c", "temperature", "log_q", "extra_c", "extra_log_q"]
    plain = in_batch_softmax(**case, correct_positive=correct_positive)
    ref = torch.autograd.grad(plain, [case[k] for k in grads])
    chunked = in_batch_softmax_chunked(**case, correct_positive=correct_positive, chunk_size=chunk_size)
    got = torch.autograd.grad(chunked, [case[k] for k in grads])
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
    for name, a, b in zip(grads, ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_chunked_equals_plain_without_options_and_passes_gradcheck():
    case = _random_case(4, b=7, m=3, d=3)
    plain = in_batch_softmax(case["q"], case["c"], temperature=0.7, reduction="none")
    chunked = in_batch_softmax_chunked(case["q"], case["c"], temperature=0.7, reduction="none", chunk_size=3)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)

    def f(q, c, t, lq, e, elq):
        return in_batch_softmax_chunked(
            q,
            c,
            temperature=t,
            item_ids=case["item_ids"],
            user_ids=case["user_ids"],
            log_q=lq,
            extra_c=e,
            extra_item_ids=case["extra_item_ids"],
            extra_log_q=elq,
            correct_positive=False,
            reduction="none",
            chunk_size=2,
        )

    inputs = tuple(case[k] for k in ("q", "c", "temperature", "log_q", "extra_c", "extra_log_q"))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
def test_bf16_autocast_masking_stays_finite_and_close(loss_fn):
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1).requires_grad_()
    items = torch.randint(0, 4, (16,), generator=g)
    ref = in_batch_softmax(q, c, temperature=0.05, item_ids=items, log_q=torch.full((16,), -3.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(q, c, temperature=0.05, item_ids=items, log_q=torch.full((16,), -3.0))
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(ref.item(), rel=0.05)
    got.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all() and q.grad.dtype == torch.float32


def test_ssl_loss_hand_worked_and_symmetric():
    # z1 @ z2.T = [[6, 3], [9, 5]] (Q2, C2); z2 @ z1.T is its transpose [[6, 9], [3, 5]]
    # z1 -> z2: rows [log(1 + e^-3), log(1 + e^4)]; z2 -> z1: rows [log(1 + e^3), log(1 + e^-2)]
    forward = (math.log1p(math.exp(-3)) + math.log1p(math.exp(4))) / 2
    backward = (math.log1p(math.exp(3)) + math.log1p(math.exp(-2))) / 2
    got = feature_dropout_ssl_loss(Q2, C2, temperature=1.0)
    assert got.item() == pytest.approx((forward + backward) / 2, rel=1e-6)
    assert feature_dropout_ssl_loss(C2, Q2, temperature=1.0).item() == pytest.approx(got.item(), rel=1e-12)
    # identical views of well-separated items: loss close to 0
    z = torch.eye(4, dtype=torch.float64)
    assert feature_dropout_ssl_loss(z, z, temperature=0.05).item() < 1e-6


def test_feature_dropout():
    codes = torch.arange(1, 2001).reshape(400, 5)
    assert torch.equal(feature_dropout(codes, 0.0), codes)
    assert feature_dropout(codes, 1.0).abs().sum().item() == 0
    a = feature_dropout(codes, 0.3, torch.Generator().manual_seed(7))
    b = feature_dropout(codes, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == codes.dtype
    kept = a != 0
    assert torch.equal(a[kept], codes[kept])  # surviving codes are untouched
    assert 0.25 <= 1 - kept.float().mean().item() <= 0.35  # ~30% dropped over 2000 codes
    assert codes.min().item() == 1  # input not modified
    with pytest.raises(ValueError, match="`p`"):
        feature_dropout(codes, 1.5)
    with pytest.raises(TypeError, match="`codes`"):
        feature_dropout(codes.float(), 0.1)


def test_errors_name_the_parameter_and_value():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"`q` and `c` must have the same shape.*\[3, 4\] and \[2, 4\]"):
        in_batch_softmax(q, torch.randn(2, 4), temperature=1.0)
    with pytest.raises(ValueError, match=r"`temperature` must be a finite float > 0, got -1"):
        in_batch_softmax(q, q, temperature=-1.0)
    with pytest.raises(ValueError, match=r"`item_ids` must have shape \[3\], got \[2\]"):
        in_batch_softmax(q, q, temperature=1.0, item_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="extra_log_q"):
        in_batch_softmax(q, q, temperature=1.0, log_q=torch.zeros(3), extra_c=torch.randn(2, 4))
    with pytest.raises(ValueError, match="`extra_item_ids` needs `item_ids`"):
        in_batch_softmax(
            q, q, temperature=1.0, extra_c=torch.randn(2, 4), extra_item_ids=torch.tensor([1, 2])
        )
    with pytest.raises(ValueError, match=r"`extra_c` must have shape \[M, 4\], got \[2, 5\]"):
        in_batch_softmax(q, q, temperature=1.0, extra_c=torch.randn(2, 5))
    with pytest.raises(ValueError, match="`reduction`"):
        in_batch_softmax(q, q, temperature=1.0, reduction="avg")
    with pytest.raises(ValueError, match="`chunk_size` must be an int >= 1, got 0"):
        in_batch_softmax_chunked(q, q, temperature=1.0, chunk_size=0)


@pytest.mark.parametrize(
    "drop", [("extra_item_ids",), ("item_ids", "extra_item_ids"), ("log_q", "extra_log_q")]
)
def test_chunked_equals_plain_with_option_subsets(drop):
    case = _random_case(6, b=9, m=4, d=5)
    for k in drop:
        case[k] = None
    grads = [k for k in ("q", "c", "temperature", "extra_c") if case[k] is not None]
    plain = in_batch_softmax(**case, reduction="none")
    chunked = in_batch_softmax_chunked(**case, reduction="none", chunk_size=4)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    ref = torch.autograd.grad(plain.sum(), [case[k] for k in grads])
    got = torch.autograd.grad(chunked.sum(), [case[k] for k in grads])
    for name, a, b in zip(grads, ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 9),
    m=st.integers(0, 4),
    chunk=st.integers(1, 10),
    n_ids=st.integers(1, 5),
    use=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_plain_property(b, m, chunk, n_ids, use, seed):
    use_items, use_users, use_logq, correct_positive = use
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    q = torch.randn(b, 3, **kw).requires_grad_()
    c = torch.randn(b, 3, **kw).requires_grad_()
    opts = dict(temperature=0.5, correct_positive=correct_positive, reduction="none")
    if use_items:
        opts["item_ids"] = torch.randint(0, n_ids, (b,), generator=g)
    if use_users:
        opts["user_ids"] = torch.randint(0, n_ids, (b,), generator=g)
    if use_logq:
        opts["log_q"] = -3 * torch.rand(b, **kw)
    if m:
        opts["extra_c"] = torch.randn(m, 3, **kw).requires_grad_()
        if use_items:
            opts["extra_item_ids"] = torch.randint(0, n_ids, (m,), generator=g)
        if use_logq:
            opts["extra_log_q"] = -3 * torch.rand(m, **kw)
    leaves = [q, c] + ([opts["extra_c"]] if m else [])
    plain = in_batch_softmax(q, c, **opts)
    chunked = in_batch_softmax_chunked(q, c, **opts, chunk_size=chunk)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    weights = torch.rand(b, **kw)  # an arbitrary upstream gradient per row
    ref = torch.autograd.grad((plain * weights).sum(), leaves)
    got = torch.autograd.grad((chunked * weights).sum(), leaves)
    for a, b_ in zip(ref, got, strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-10, atol=1e-12)
