"""Row segments of a sparse gradient with fixed shapes (sort + cumsum; no ``unique`` or ``coalesce``, whose sizes
depend on the data and make the host wait for the device): shared by row-wise Adagrad's torch update
(``recsys.train.optim``) and its Triton kernels (``recsys.train.kernels.triton_optim``)."""

from __future__ import annotations

import torch
from torch import Tensor


def sorted_segments(idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort row indices and number their runs, with fixed shapes (no ``unique``, no host sync).

    Args:
        idx: ``[n]`` row indices, repeats allowed.
    Returns:
        ``(rows [n], order [n], first [n] bool, seg [n])``: ``rows = idx[order]`` sorted; ``first[j]`` marks the
        first entry of each distinct row; ``seg[j]`` is the number of ``rows[j]``'s run (0, 1, ...).
    """
    rows, order = torch.sort(idx)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    seg = torch.cumsum(first, 0) - 1  # segments beyond the count are never referenced
    return rows, order, first, seg


def segment_rows(idx: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sum the gradient rows of repeated indices, keeping fixed shapes.

    Args:
        idx: ``[n]`` row indices, repeats allowed (an uncoalesced sparse gradient's indices).
        values: ``[n, E]`` the matching gradient rows.
    Returns:
        ``(rows [n], total [n, E], first [n] bool)`` in sorted order: ``total[j]`` is the sum of every gradient
        row of ``rows[j]``; ``first[j]`` marks one representative per distinct row (the others must add nothing).
    """
    rows, order, first, seg = sorted_segments(idx)
    sv = values[order]  # [n, E]
    sums = torch.zeros_like(sv).index_add_(0, seg, sv)  # [n, E]
    return rows, sums[seg], first
