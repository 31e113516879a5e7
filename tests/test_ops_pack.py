"""Bit packing: exact round trips on odd shapes and the documented bit layouts."""

from __future__ import annotations

import pytest
import torch

from lowbit.ops import pack as P

ODD_K = [1, 7, 31, 32, 33, 63, 257]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("k", ODD_K)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("row_align", [1, 16])
def test_int4_round_trip(gen, k, signed, row_align):
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (3, 5, k), generator=gen)
    packed = P.pack_int4(q, row_align)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, P.packed_row_len(k, 4, row_align))
    assert torch.equal(P.unpack_int4(packed, k, signed).to(torch.int64), q)


@pytest.mark.parametrize("k", ODD_K)
@pytest.mark.parametrize("signed", [True, False])
def test_int2_round_trip(gen, k, signed):
    lo, hi = (-2, 2) if signed else (0, 4)
    q = torch.randint(lo, hi, (4, k), generator=gen)
    packed = P.pack_int2(q)
    assert packed.shape == (4, P.packed_row_len(k, 2))
    assert torch.equal(P.unpack_int2(packed, k, signed).to(torch.int64), q)


@pytest.mark.parametrize("k", ODD_K)
def test_binary_round_trip(gen, k):
    s = torch.randint(0, 2, (6, k), generator=gen) * 2 - 1
    packed = P.pack_binary(s)
    assert packed.dtype == torch.int32 and packed.shape == (6, P.packed_row_len(k, 1))
    assert torch.equal(P.unpack_binary(packed, k).to(torch.int64), s)


@pytest.mark.parametrize("k", ODD_K)
@pytest.mark.parametrize("signed", [True, False])
def test_bitplanes_round_trip(gen, k, signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (5, k), generator=gen)
    planes = P.pack_bitplanes(q)
    assert planes.shape == (5, 4, P.packed_row_len(k, 1))
    assert torch.equal(P.unpack_bitplanes(planes, k, signed).to(torch.int64), q)


def test_int4_layout_low_nibble_is_even_k():
    packed = P.pack_int4(torch.tensor([[1, 2, -1, 7, 5]]), row_align=1)
    # bytes: (k0=1 | k1=2 << 4), (k2=-1 -> 0xF | k3=7 << 4), (k4=5 | pad 0)
    assert packed.tolist() == [[0x21, 0x7F, 0x05]]


def test_int2_layout_lowest_bits_are_lowest_k():
    packed = P.pack_int2(torch.tensor([[1, 2, 3, 0, -1]]), row_align=1)
    assert packed.tolist() == [[1 | (2 << 2) | (3 << 4), 0x3]]


def test_binary_layout_lowest_bit_is_lowest_k_and_sign_of_zero():
    x = torch.full((1, 33), -1.0)
    x[0, 0] = 1.0
    x[0, 31] = 0.0  # sign(0) = +1
    x[0, 32] = 2.5
    words = P.pack_binary(x, row_align=1)
    assert words.tolist() == [[1 | (-(2**31)), 1]]  # bit 31 set: a negative int32


def test_rows_are_padded_to_16_bytes_with_zeros():
    assert P.packed_row_len(1, 8) == 16 and P.packed_row_len(17, 8) == 32
    assert P.packed_row_len(33, 4) == 32 and P.packed_row_len(64, 4) == 32
    assert P.packed_row_len(129, 1) == 8 and P.packed_row_len(128, 1) == 4
    assert P.pad_k(300, 1) == 384
    assert (P.pack_int4(torch.full((2, 3), 7))[:, 2:] == 0).all()
    assert (P.pack_binary(torch.ones(2, 3))[:, 1:] == 0).all()


def test_popcount_matches_python():
    vals = torch.tensor([0, 1, -1, 2**31 - 1, -(2**31), 0x0F0F0F0F, -123456789], dtype=torch.int32)
    expected = [bin(v & 0xFFFFFFFF).count("1") for v in vals.tolist()]
    assert P.popcount32(vals).tolist() == expected
    assert P.row_popcount(vals.reshape(1, -1)).tolist() == [sum(expected)]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[-8, 15\]"):
        P.pack_int4(torch.tensor([[16]]))
    with pytest.raises(TypeError):
        P.pack_int4(torch.tensor([[1.5]]))
    with pytest.raises(ValueError, match="fewer than"):
        P.unpack_int4(torch.zeros(1, 2, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="unsupported bit width"):
        P.packed_row_len(4, 3)
