"""Hostile qcow2 headers, parsed without touching a file: every header is either refused
with an ``ImageError`` that names the file, or accepted with every table it describes
inside the file and every size within QEMU's limits, so that opening it can neither
allocate more memory than the file has bytes nor read at offsets the OS cannot express.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chainfs.errors import ImageError
from chainfs.formats.qcow2 import create_overlay
from chainfs.formats.qcow2 import header as hdr
from chainfs.hostfile import HostFile

PATH = "/images/hostile.qcow2"
CS = 4096

# (offset, width) of every fixed header field after the magic
FIELDS = [
    (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
    (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
]  # fmt: skip


def good_header(backing: bytes = b"base.qcow2") -> bytearray:
    """Cluster 0 of a valid 1 MiB v3 image with 4 KiB clusters and a backing file."""
    h = hdr.Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=12,
        size=1 << 20,
        crypt_method=0,
        l1_size=1,
        l1_table_offset=3 * CS,
        refcount_table_offset=CS,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        header_length=hdr.QEMU_HEADER_LENGTH,
        extra=bytes(hdr.QEMU_HEADER_LENGTH - hdr.V3_HEADER_LENGTH),
        extensions=[(hdr.EXT_BACKING_FORMAT, b"qcow2")],
    )
    head = h.pack_fields() + h.pack_extensions()
    h.backing_file_offset, h.backing_file_size = len(head), len(backing)
    raw = bytearray(CS)
    raw[: len(head)] = h.pack_fields() + h.pack_extensions()
    raw[len(head) : len(head) + len(backing)] = backing
    return raw


FILE_SIZE = 4 * CS + 8  # header, refcount table, refcount block, L1


def test_the_template_is_accepted() -> None:
    h = hdr.parse(bytes(good_header()), PATH, FILE_SIZE)
    assert h.backing_file == "base.qcow2" and h.backing_format == "qcow2"


def interesting(width: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    specials = [0, 1, 7, 8, 9, 12, 21, 22, 63, 64, 72, 103, 104, 105, 112, 511, 512, CS - 1]
    specials += [CS, CS + 8, 2 * CS, 3 * CS, 1023, 1024, FILE_SIZE, FILE_SIZE + CS, 1 << 20]
    specials += [1 << 31, (1 << 32) - 1, 1 << 62, 1 << 63, (1 << 63) - CS, top]
    return st.one_of(st.sampled_from([v for v in specials if v <= top]), st.integers(0, top))


@st.composite
def mutated_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    raw = good_header(draw(st.sampled_from([b"base.qcow2", b"", b"b" * 1023, b"b" * 1024])))
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            off, width = draw(st.sampled_from(FIELDS))
            raw[off : off + width] = draw(interesting(width)).to_bytes(width, "big")
        else:
            at = draw(st.integers(0, 400))
            raw[at] = draw(st.integers(0, 255))
    length = draw(st.sampled_from([CS, 104, 72, 200, 4000]))
    size = draw(st.sampled_from([FILE_SIZE, 0, 100, CS, 1 << 30]))
    return bytes(raw[:length]), size


def check_accepted(h: hdr.Header, file_size: int) -> None:
    """What an accepted header promises the driver."""
    cs = h.cluster_size
    assert 9 <= h.cluster_bits <= 21
    assert h.version in (2, 3)
    assert h.size <= hdr.MAX_VIRTUAL_SIZE
    assert h.l1_size * 8 <= min(hdr.MAX_L1_BYTES, file_size)
    assert h.l1_size * cs * (cs // 8) >= h.size
    if h.l1_size:
        assert h.l1_table_offset % cs == 0 and h.l1_table_offset + h.l1_size * 8 <= file_size
    reftable = h.refcount_table_clusters * cs
    assert 0 < reftable <= min(hdr.MAX_REFTABLE_BYTES, file_size)
    assert h.refcount_table_offset % cs == 0
    assert h.refcount_table_offset + reftable <= file_size
    assert h.refcount_order <= 6
    assert h.nb_snapshots <= hdr.MAX_SNAPSHOTS
    assert h.backing_file_offset < cs
    if h.backing_file is not None:
        assert h.backing_file_offset >= h.header_length
        assert len(h.backing_file.encode()) <= hdr.MAX_BACKING_NAME
        assert "\0" not in h.backing_file
    assert h.header_length <= cs
    # what the driver writes back must be what it read
    assert len(h.pack_fields()) == h.header_length


def header_is_refused_or_sane(case: tuple[bytes, int]) -> None:
    raw, file_size = case
    try:
        h = hdr.parse(raw, PATH, file_size)
    except ImageError as e:  # UnsupportedFeature is one too
        assert PATH in str(e), str(e)
        assert "\n" not in str(e)
        event("refused")
        return
    check_accepted(h, file_size)
    event("accepted")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_headers())
def test_fuzzed_header_is_refused_or_sane(case: tuple[bytes, int]) -> None:
    header_is_refused_or_sane(case)


@pytest.mark.slow
@settings(max_examples=50000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_headers())
def test_fuzzed_header_is_refused_or_sane_many(case: tuple[bytes, int]) -> None:
    header_is_refused_or_sane(case)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(0, 1 << 40))
def test_random_bytes_after_the_magic(tail: bytes, file_size: int) -> None:
    header_is_refused_or_sane((hdr.MAGIC + tail, file_size))


def refusal(raw: bytes | bytearray, file_size: int = FILE_SIZE) -> str:
    with pytest.raises(ImageError) as info:
        hdr.parse(bytes(raw), PATH, file_size)
    message = str(info.value)
    assert PATH in message
    return message


def with_field(offset: int, width: int, value: int, raw: bytearray | None = None) -> bytearray:
    raw = good_header() if raw is None else raw
    raw[offset : offset + width] = value.to_bytes(width, "big")
    return raw


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ((4, 4), 1, "version 1"),
        ((4, 4), 0xFFFFFFFF, "version 4294967295"),
        ((20, 4), 8, "invalid cluster size"),
        ((20, 4), 22, "invalid cluster size"),
        ((20, 4), 0xFFFFFFFF, "invalid cluster size"),
        ((24, 8), 1 << 63, "absurd virtual size"),
        ((24, 8), (1 << 64) - 1, "absurd virtual size"),
        ((24, 8), 1 << 40, "l1 table too small"),
        ((36, 4), 0xFFFFFFFF, "absurd l1 table size"),
        ((36, 4), (32 << 20) // 8, "past the end of the file"),
        ((40, 8), 0, "misaligned l1 table"),
        ((40, 8), 3 * CS + 8, "misaligned l1 table"),
        ((40, 8), 64 * CS, "l1 table (offset 0x40000, 8 bytes) past the end of the file"),
        ((40, 8), (1 << 64) - CS, "past the end of the file"),
        ((48, 8), 0, "misaligned refcount table"),
        ((48, 8), 1 << 63, "refcount table"),
        ((56, 4), 0, "invalid refcount table size"),
        ((56, 4), 0xFFFFFFFF, "invalid refcount table size"),
        ((56, 4), 4, "refcount table (offset 0x1000, 16384 bytes) past the end"),
        ((60, 4), 0xFFFFFFFF, "absurd 4294967295 internal snapshots"),
        ((64, 8), 0, "misaligned snapshot table"),
        ((96, 4), 7, "invalid refcount order"),
        ((100, 4), 105, "invalid header length 105"),
        ((100, 4), 96, "invalid header length 96"),
        ((100, 4), CS + 8, "invalid header length"),
        ((100, 4), 0xFFFFFFFF, "invalid header length"),
        ((8, 8), CS, "outside the header cluster"),
        ((8, 8), 1 << 63, "outside the header cluster"),
        ((8, 8), 8, "inside the header fields"),
        ((16, 4), 1024, "1024 bytes; at most 1023"),
        ((16, 4), 0xFFFFFFFF, "at most 1023"),
    ],
)
def test_named_header_damage(field: tuple[int, int], value: int, words: str) -> None:
    raw = good_header()
    if field == (60, 4) and value == 0xFFFFFFFF:
        with_field(64, 8, 2 * CS, raw)
    if field == (64, 8):
        with_field(60, 4, 1, raw)
    assert words in refusal(with_field(*field, value, raw)).lower()


def test_extension_running_past_the_cluster() -> None:
    raw = good_header()
    with_field(hdr.QEMU_HEADER_LENGTH + 4, 4, 0xFFFFFFF0, raw)
    assert "extension running past its end" in refusal(raw)


def test_extension_running_into_the_backing_name() -> None:
    raw = good_header()
    offset = struct.unpack_from(">Q", raw, 8)[0]
    length = offset - hdr.QEMU_HEADER_LENGTH - 8 + 1  # one byte into the name
    with_field(hdr.QEMU_HEADER_LENGTH + 4, 4, length, raw)
    assert "extension running past its end" in refusal(raw)


def test_backing_name_of_exactly_1023_bytes_is_accepted() -> None:
    name = "d" * 1023
    h = hdr.parse(bytes(good_header(name.encode())), PATH, FILE_SIZE)
    assert h.backing_file == name


def test_backing_name_running_past_the_cluster() -> None:
    raw = good_header(b"b" * 1023)
    # the name starts 100 bytes before the cluster's end but claims 1023 bytes
    with_field(8, 8, CS - 100, raw)
    assert "past the header cluster" in refusal(raw)


def test_backing_name_past_a_short_file() -> None:
    raw = good_header(b"b" * 500)
    # a truncated header cluster: the name would lie past what the file holds
    message = refusal(raw[: struct.unpack_from(">Q", raw, 8)[0] + 10])
    assert "backing file name running past the end of the file" in message


def test_backing_name_that_is_not_utf8_or_has_nul() -> None:
    assert "not utf-8" in refusal(good_header(b"base\xff.qcow2")).lower()
    assert "nul byte" in refusal(good_header(b"base\0.qcow2")).lower()


def test_truncated_headers() -> None:
    raw = bytes(good_header())
    assert "not a qcow2 image" in refusal(raw[:71])
    assert "truncated header" in refusal(raw[:100])
    assert "truncated header" in refusal(raw[:110])


def _outcome(raw: bytes, file_size: int) -> object:
    try:
        return hdr.parse(raw, PATH, file_size)
    except ImageError as e:  # (UnsupportedFeature among them)
        return (type(e), str(e))


@pytest.fixture(scope="module")
def real_clusters(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, int]]:
    """Cluster 0 (64 KiB) of images chainfs makes: with and without a backing file."""
    d = tmp_path_factory.mktemp("headers")
    create_overlay(str(d / "A.qcow2"), size=1 << 30, backing=None, backing_format=None)
    create_overlay(str(d / "B.qcow2"), size=1 << 30, backing="A.qcow2", backing_format="qcow2")
    out = []
    for name in ("A.qcow2", "B.qcow2"):
        f = HostFile(str(d / name), False)
        try:
            out.append((bytes(hdr.header_cluster(f)), f.size()))
            assert hdr._used_within(out[-1][0][: hdr.HEAD_READ])  # (the quick read)
        finally:
            f.close()
    return out


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, 1),
    damage=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=6),
)
def test_the_first_4_kib_parse_as_the_whole_cluster(
    real_clusters: list[tuple[bytes, int]], which: int, damage: list[tuple[int, int]]
) -> None:
    """``read_header`` parses the first 4 KiB alone when ``_used_within`` says all that
    ``parse`` reads lies there: the same header, or the same refusal, as from the whole
    cluster, however the first 4 KiB are damaged."""
    raw, size = real_clusters[which]
    cluster = bytearray(raw)
    for offset, value in damage:
        cluster[offset] = value
    head = bytes(cluster[: hdr.HEAD_READ])
    if hdr._used_within(head):
        event("quick")
        assert _outcome(head, size) == _outcome(bytes(cluster), size)
