"""probe.framing without sockets: reassembly under any split, exact defects."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from probe.framing import HEADER_SIZE, Decoder, Kind, encode, payload, stream_of

STREAM = 0x1234ABCD
sizes_st = st.lists(st.integers(0, 3000), min_size=1, max_size=8)


def stream(sizes: list[int], stream_id: int = STREAM) -> bytes:
    return b"".join(encode(stream_id, seq, n) for seq, n in enumerate(sizes))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def decode(data: bytes, frame_count: int, cuts: list[int],
           stream_id: int = STREAM) -> Decoder:
    decoder = Decoder(stream_id, frame_count)
    completed = sum(decoder.feed(chunk) for chunk in split(data, cuts))
    assert completed == decoder.frames_ok
    decoder.feed(b"")
    return decoder


def frame_start(sizes: list[int], seq: int) -> int:
    return sum(HEADER_SIZE + n for n in sizes[:seq])


@settings(max_examples=200, deadline=None)
@given(sizes_st, st.lists(st.integers(0, 1 << 16)), st.integers(0, 2**32 - 1))
def test_round_trip_under_any_split(sizes: list[int], cuts: list[int], stream_id: int) -> None:
    data = stream(sizes, stream_id)
    decoder = decode(data, len(sizes), cuts, stream_id)
    assert decoder.defect is None
    assert decoder.done
    assert decoder.frames_ok == len(sizes)
    assert decoder.bytes_ok == len(data)


def test_one_byte_at_a_time() -> None:
    sizes = [1, 0, 300]
    data = stream(sizes)
    decoder = decode(data, 3, list(range(len(data))))
    assert decoder.done and decoder.defect is None


def test_frame_layout() -> None:
    frame = encode(STREAM, 7, 5)
    assert len(frame) == HEADER_SIZE + 5
    assert frame[:2] == b"PF"
    assert stream_of(frame) == STREAM
    assert stream_of(b"XX" + frame[2:]) is None
    assert frame[HEADER_SIZE:] == payload(STREAM, 7, 5)
    assert payload(STREAM, 7, 64) != payload(STREAM, 8, 64) != payload(STREAM + 1, 7, 64)


@settings(max_examples=200, deadline=None)
@given(sizes_st, st.integers(0, 1 << 20), st.integers(1, 255), st.lists(st.integers(0, 1 << 16)))
def test_a_flipped_byte_is_found_exactly(sizes: list[int], where: int, mask: int,
                                         cuts: list[int]) -> None:
    data = bytearray(stream(sizes))
    position = where % len(data)
    data[position] ^= mask
    decoder = decode(bytes(data), len(sizes), cuts)
    assert decoder.defect is not None
    assert decoder.defect.kind is Kind.CORRUPTED
    seq = max(i for i in range(len(sizes)) if frame_start(sizes, i) <= position)
    offset = position - frame_start(sizes, seq)
    detail = decoder.defect.detail
    assert decoder.frames_ok == seq
    if offset >= HEADER_SIZE:
        assert detail == (f"frame {seq} payload byte {offset - HEADER_SIZE} of {sizes[seq]} "
                          f"(stream byte {position})")
    elif offset < 10:   # magic, stream id, seq: a receiver knows what they must be
        assert detail == f"frame {seq} header byte {offset} (stream byte {position})"
    else:
        start = frame_start(sizes, seq)
        assert detail == (f"frame {seq} header: bad length or checksum "
                          f"(stream bytes {start + 10}-{start + HEADER_SIZE - 1})")


@settings(max_examples=200, deadline=None)
@given(sizes_st, st.integers(0, 1 << 20), st.lists(st.integers(0, 1 << 16)))
def test_a_cut_stream_is_truncated(sizes: list[int], where: int, cuts: list[int]) -> None:
    data = stream(sizes)
    keep = where % len(data)
    decoder = decode(data[:keep], len(sizes), cuts)
    assert decoder.defect is not None and decoder.defect.kind is Kind.TRUNCATED
    seq = max(i for i in range(len(sizes)) if frame_start(sizes, i) <= keep)
    assert decoder.frames_ok == seq
    assert decoder.defect.detail.startswith(
        f"frame {seq} " if keep > frame_start(sizes, seq) else f"EOF after {seq} of ")


def test_truncation_details() -> None:
    sizes = [1, 100, 50]
    data = stream(sizes)
    third = frame_start(sizes, 2)
    cases = {
        third: "EOF after 2 of 3 frames",
        third + 5: f"frame 2 ended inside its header (5 of {HEADER_SIZE} bytes, "
                   "2 of 3 frames whole)",
        third + HEADER_SIZE + 20: "frame 2 ended after 20 of 50 payload bytes "
                                  "(2 of 3 frames whole)",
    }
    for keep, detail in cases.items():
        defect = decode(data[:keep], 3, [7, 61]).defect
        assert defect is not None and defect.kind is Kind.TRUNCATED
        assert defect.detail == detail


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=2, max_size=6), st.data())
def test_reordered_repeated_foreign_and_extra_frames(sizes: list[int], data: st.DataObject
                                                     ) -> None:
    frames = [encode(STREAM, seq, n) for seq, n in enumerate(sizes)]
    cuts = data.draw(st.lists(st.integers(0, 1 << 12)))
    k = data.draw(st.integers(0, len(sizes) - 2))
    at = frame_start(sizes, k)

    swapped = frames[:k] + [frames[k + 1], frames[k]] + frames[k + 2:]
    defect = decode(b"".join(swapped), len(sizes), cuts).defect
    assert defect is not None and defect.kind is Kind.OUT_OF_ORDER
    assert defect.detail == f"frame {k + 1} where frame {k} was due (stream byte {at})"

    repeated = frames[:k + 1] + [frames[k]] + frames[k + 1:]
    defect = decode(b"".join(repeated), len(sizes), cuts).defect
    at_next = frame_start(sizes, k + 1)
    assert defect is not None and defect.kind is Kind.DUPLICATED
    assert defect.detail == f"frame {k} again where frame {k + 1} was due (stream byte {at_next})"

    foreign = frames[:k] + [encode(0xFEEDF00D, k, 3)] + frames[k:]
    defect = decode(b"".join(foreign), len(sizes), cuts).defect
    assert defect is not None and defect.kind is Kind.MIXED
    assert defect.detail == (f"frame {k} of stream feedf00d arrived on stream 1234abcd where "
                             f"its frame {k} was due (stream byte {at})")

    extra = data.draw(st.binary(min_size=1, max_size=50))
    defect = decode(b"".join(frames) + extra, len(sizes), cuts).defect
    assert defect is not None and defect.kind is Kind.EXTRA
    assert defect.detail.endswith(f"bytes after the last frame (stream byte "
                                  f"{frame_start(sizes, len(sizes))})")


def test_nothing_more_is_read_after_a_defect() -> None:
    decoder = Decoder(STREAM, 2)
    assert decoder.feed(encode(STREAM, 1, 4)) == 0
    assert decoder.defect is not None and decoder.defect.kind is Kind.OUT_OF_ORDER
    assert decoder.feed(encode(STREAM, 0, 4)) == 0
    assert decoder.feed(b"") == 0
    assert decoder.defect.kind is Kind.OUT_OF_ORDER and not decoder.done


def test_a_big_frame_corrupted_near_its_end() -> None:
    size = 1 << 20
    data = bytearray(stream([1, size]))
    data[-2] ^= 0x40
    rng = random.Random(5)
    decoder = decode(bytes(data), 2, [rng.randrange(len(data)) for _ in range(40)])
    assert decoder.defect is not None
    assert decoder.defect.detail == (f"frame 1 payload byte {size - 2} of {size} "
                                     f"(stream byte {len(data) - 2})")
