import itertools

from hypothesis import given
from hypothesis import strategies as st

from vmrepl.extent import Extent, align_in, align_out, clip, complement, intersect, merge, split_blocks, subtract, total

SPAN = 200


def as_set(extents: list[Extent]) -> set[int]:
    return {b for e in extents for b in range(e.offset, e.end)}


def is_normal(extents: list[Extent]) -> bool:
    return all(a.end < b.offset for a, b in itertools.pairwise(extents)) and all(e.length > 0 for e in extents)


extent_lists = st.lists(
    st.tuples(st.integers(0, SPAN - 1), st.integers(1, 40)).map(lambda t: Extent(t[0], t[1])), max_size=12
)


@given(extent_lists)
def test_merge_keeps_bytes_and_normalises(xs: list[Extent]) -> None:
    m = merge(xs)
    assert as_set(m) == as_set(xs)
    assert is_normal(m)


@given(extent_lists, extent_lists)
def test_intersect_subtract_match_set_model(a: list[Extent], b: list[Extent]) -> None:
    ma, mb = merge(a), merge(b)
    inter, diff = intersect(ma, mb), subtract(ma, mb)
    assert as_set(inter) == as_set(ma) & as_set(mb)
    assert as_set(diff) == as_set(ma) - as_set(mb)
    assert is_normal(inter) and is_normal(merge(diff)) and diff == merge(diff)


@given(extent_lists, st.integers(0, SPAN), st.integers(0, SPAN))
def test_clip_and_complement(a: list[Extent], lo: int, hi: int) -> None:
    ma = merge(a)
    window = set(range(lo, hi))
    assert as_set(clip(ma, lo, hi)) == as_set(ma) & window
    assert as_set(complement(ma, lo, hi)) == window - as_set(ma)


@given(extent_lists, st.sampled_from([4, 8, 16]), st.integers(1, SPAN + 50))
def test_align_out_covers_whole_blocks(a: list[Extent], bs: int, disk: int) -> None:
    ma = [e for e in clip(merge(a), 0, disk)]
    aligned = align_out(ma, bs, disk)
    assert as_set(ma) <= as_set(aligned)
    assert is_normal(aligned)
    for e in aligned:
        assert e.offset % bs == 0
        assert e.end % bs == 0 or e.end == disk
    # No block is added that the input did not touch.
    touched = {b // bs for b in as_set(ma)}
    assert {b // bs for b in as_set(aligned)} == touched


@given(extent_lists, st.sampled_from([4, 8, 16]), st.integers(1, SPAN + 50))
def test_align_in_keeps_only_whole_blocks(a: list[Extent], bs: int, disk: int) -> None:
    ma = clip(merge(a), 0, disk)
    inner = align_in(ma, bs, disk)
    assert as_set(inner) <= as_set(ma)
    whole = {b for b in range(0, disk, bs) if set(range(b, min(b + bs, disk))) <= as_set(ma)}
    assert {b // bs * bs for b in as_set(inner)} == whole


@given(extent_lists, st.sampled_from([4, 8, 16]))
def test_split_blocks_never_crosses_a_boundary(a: list[Extent], bs: int) -> None:
    ma = merge(a)
    pieces = list(split_blocks(ma, bs))
    assert total(pieces) == total(ma)
    assert as_set(pieces) == as_set(ma)
    for p in pieces:
        assert p.offset // bs == (p.end - 1) // bs


def test_extent_rejects_bad_values() -> None:
    for off, length in [(-1, 1), (0, 0), (5, -3)]:
        try:
            Extent(off, length)
        except ValueError:
            continue
        raise AssertionError(f"Extent({off}, {length}) accepted")
