"""Sequence bookkeeping (``core/sequence.py``) against plain-Python references: left-padded column
indices, gathers with padding fill, masks; rows of different lengths, empty rows, M-RoPE positions."""

import pytest
import torch

from tokenreduce.core.sequence import column_index, gather_columns, padding_mask

ROWS = [
    [[0, 2, 5], [1], [3, 4, 6, 7]],
    [[], [2, 3]],
    [[4, 1]],
    [[], []],
]


def _reference_index(rows):
    length = max((len(r) for r in rows), default=0)
    return [[-1] * (length - len(r)) + list(r) for r in rows]


@pytest.mark.parametrize("rows", ROWS, ids=["uneven", "empty-row", "one-row", "all-empty"])
def test_column_index_left_pads_with_minus_one(rows):
    index = column_index([torch.tensor(r, dtype=torch.long) for r in rows])
    assert index.dtype == torch.long
    assert index.tolist() == _reference_index(rows)
    assert padding_mask(index).tolist() == [[int(c >= 0) for c in r] for r in _reference_index(rows)]
    assert padding_mask(index).dtype == torch.long


def test_column_index_of_no_rows():
    assert column_index([]).shape == (0, 0)


@pytest.mark.parametrize("fill", [0, -100, 7.5])
def test_gather_columns_2d_and_mrope(fill):
    rows = ROWS[0]
    index = column_index([torch.tensor(r) for r in rows])
    tensor = torch.arange(3 * 8).reshape(3, 8) * 10 + 1
    expected = [[fill if c < 0 else int(tensor[b, c]) for c in row] for b, row in enumerate(_reference_index(rows))]
    got = gather_columns(tensor.float() if isinstance(fill, float) else tensor, index, fill=fill)
    assert got.tolist() == expected
    # [3, B, L] positions: every axis gathered at the same columns
    mrope = torch.stack([tensor, tensor + 1000, tensor + 2000])
    got3 = gather_columns(mrope, index, fill=-5)
    assert got3.shape == (3, *index.shape)
    for axis in range(3):
        assert got3[axis].tolist() == [[-5 if c < 0 else int(mrope[axis, b, c]) for c in row]
                                       for b, row in enumerate(_reference_index(rows))]


def test_gather_columns_default_fill_is_zero():
    index = column_index([torch.tensor([1]), torch.tensor([0, 2])])
    tensor = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert gather_columns(tensor, index).tolist() == [[0, 6], [8, 10]]
