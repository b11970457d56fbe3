"""Byte layout of galera.cache (Galera 4, preamble ``Version: 2``), shared by the cache and the scanner.

    offset 0      1024        1280                                  1280+size  +24
           |preamble|reserved |ring buffer: [BH|payload][BH|payload]... |zero BH|
           ASCII,    256 zero                                             room for the
           NUL-padded bytes                                               trailing zero header

Every buffer starts with a 24-byte little-endian BufferHeader (``gcache_bh.hpp``)::

    seqno_g i64 | ctx u64 | size u32 (incl. header, multiple of 8) | flags u16 | store i8 | type i8

Galera keeps a pointer in ``ctx``. istd keeps a checksum there: ``ctx = MAGIC32 << 32 | crc32`` over the
history GID, the header fields except ctx, and the whole buffer body. A user-space pointer never has the
MAGIC32 high bits, so a header without them is one Galera wrote: it gets structural checks only (and
its ctx must look like a pointer).

istd's buffers end with 1..8 bytes of padding whose last byte is the padding length, so that ``size``
stays a multiple of 8 (Galera steps from header to header by ``size``) and the exact payload length can
still be recovered: ``payload = body[:size - 24 - body[-1]]``. The checksum covers the payload only; a
damaged padding byte changes the payload length and so fails it too. A Galera buffer's payload is its
whole body.
"""

from __future__ import annotations

import re
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

PREAMBLE_LEN = 1024
HEADER_LEN = 256
RING_START = PREAMBLE_LEN + HEADER_LEN  # 1280: first byte of the ring buffer
BH_SIZE = 24
FILE_OVERHEAD = RING_START + BH_SIZE  # file size = gcache.size + 1304 (Galera's check_size())
ALIGNMENT = 8  # GU_MIN_ALIGNMENT
VERSION = 2  # preamble version: buffers aligned to 8 bytes
MIN_SIZE_BYTES = 64  # a smaller ring could not hold one empty write-set and the zero header

# BufferHeader flags, stores and the gcs action types gcache sees.
RELEASED = 1
SKIPPED = 2
FLAGS_MAX = RELEASED | SKIPPED
STORE_MEM = 0
STORE_RB = 1
STORE_PAGE = 2
WRITESET = 0  # GCS_ACT_WRITESET
CCHANGE = 3  # GCS_ACT_CCHANGE
SEQNO_NONE = 0  # allocated, never ordered
SEQNO_ILL = -1  # discarded

MAGIC32 = 0x49535444  # "ISTD"
MAGIC_CTX = MAGIC32 << 32
# Galera's ctx is a pointer to its RingBuffer object: non-zero, 8-aligned, and in user space (below 2^48
# on x86-64 and arm64). Flipping any one bit of MAGIC_CTX leaves its top byte >= 0x08, far above that, so
# a damaged istd header is not taken for one Galera wrote (which would escape the checksum).
POINTER_LIMIT = 1 << 48
ZERO_BH = bytes(BH_SIZE)

BH = struct.Struct("<qQIHbb")
BH_MARK = struct.Struct("<qQ")  # seqno_g, ctx: how a buffer is marked discarded in place
CRC_PREFIX = struct.Struct("<qIHbb")  # seqno_g, size, flags, store, type

# The last four header bytes of any ring buffer: flags (0..3, high byte 0), store RB, any type. The
# unclean-recovery scan searches for this with a regex (C speed) instead of testing every offset.
HEADER_TAIL = re.compile(rb"[\x00-\x03]\x00\x01.", re.DOTALL)

PREAMBLE_KEYS = ("Version:", "GID:", "seqno_min:", "seqno_max:", "offset:", "synced:")
NIL_UUID = uuid.UUID(int=0)


def buffer_size(payload_len: int) -> int:
    """Total aligned size of an istd buffer (header + payload + 1..8 byte trailer)."""
    return (payload_len + BH_SIZE + ALIGNMENT) & ~(ALIGNMENT - 1)


def record_crc(gid_crc: int, seqno: int, size: int, flags: int, store: int, type_: int, payload: Any) -> int:
    """crc32 of an istd buffer, ``gid_crc`` being ``zlib.crc32(gid.bytes)``."""
    return zlib.crc32(payload, zlib.crc32(CRC_PREFIX.pack(seqno, size, flags, store, type_), gid_crc))


def gid_crc(gid: uuid.UUID) -> int:
    return zlib.crc32(gid.bytes)


_SUFFIX = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGTPE]?)\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a Galera size option: ``"128M"``, ``"1G"``, ``"512K"``, ``"4096"`` (suffixes are powers of
    1024, as in Galera). Raises ValueError on anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r}")
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4096, 512K, 128M, 1G)")
    return int(m.group(1)) << (10 * _SUFFIX[m.group(2).upper()])


@dataclass(frozen=True)
class Preamble:
    """The parsed text preamble. ``seqno_min``/``seqno_max``/``offset`` are -1 when absent."""

    version: int
    gid: uuid.UUID
    seqno_min: int = -1
    seqno_max: int = -1
    offset: int = -1
    synced: bool = False


def parse_preamble(raw: bytes) -> Preamble:
    """Parse the first 1024 bytes of a gcache file. Raises ValueError (with the reason) if they are not
    a gcache preamble: no NUL-terminated ASCII text, or no ``Version:``/``GID:`` line."""
    text = raw[:PREAMBLE_LEN].split(b"\0", 1)[0]
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("preamble is not ASCII text") from None
    fields: dict[str, str] = {}
    for line in decoded.split("\n"):
        parts = line.split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] in PREAMBLE_KEYS:
            fields[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    if "Version:" not in fields or "GID:" not in fields:
        raise ValueError("no 'Version:' and 'GID:' lines in the preamble")
    try:
        version = int(fields["Version:"])
        gid = uuid.UUID(fields["GID:"])
    except ValueError:
        raise ValueError(f"bad Version/GID in the preamble: {fields}") from None

    def _int(key: str) -> int:
        try:
            return int(fields.get(key, "-1"))
        except ValueError:
            return -1

    synced = fields.get("synced:", "0").strip() in ("1", "true", "yes")
    return Preamble(version, gid, _int("seqno_min:"), _int("seqno_max:"), _int("offset:"), synced)


def format_preamble(gid: uuid.UUID, synced: bool, seqno_min: int = -1, seqno_max: int = -1,
                    offset: int = -1) -> bytes:
    """The 1024-byte preamble exactly as Galera writes it (``RingBuffer::write_preamble``)."""
    lines = [f"Version: {VERSION}", f"GID: {gid}"]
    if synced:
        if seqno_min >= 0 and seqno_max >= 0 and offset >= 0:
            lines += [f"seqno_min: {seqno_min}", f"seqno_max: {seqno_max}", f"offset: {offset}"]
        else:
            lines += ["seqno_min: -1", "seqno_max: -1"]
    lines.append(f"synced: {1 if synced else 0}")
    text = ("\n".join(lines) + "\n\n").encode("ascii")[: PREAMBLE_LEN - 1]
    return text + bytes(PREAMBLE_LEN - len(text))


class Probe(NamedTuple):
    """One buffer header found in the ring. ``checksum``: 'ok' (istd, crc matches), 'bad' (istd, does
    not match), 'none' (written by Galera, or a discarded/unordered istd buffer whose crc is not kept)."""

    offset: int  # of the header, from the start of the file
    seqno: int
    size: int
    flags: int
    store: int
    type: int
    checksum: str
    length: int  # payload length
    end: int  # offset + size: where the next buffer (or a zero header) should be

    @property
    def usable(self) -> bool:
        """An ordered buffer whose bytes can be trusted."""
        return self.seqno > 0 and self.checksum != "bad"


_tuple_new = tuple.__new__
_crc32 = zlib.crc32
_unpack_bh = BH.unpack_from
_pack_prefix = CRC_PREFIX.pack


def probe(buf: Any, h: int, ring_end: int, gcrc: int) -> Probe | None:
    """Test whether a plausible ring buffer header sits at ``h`` (Galera's ``BH_test`` plus alignment and
    bounds) and check its crc if istd wrote it. Returns None for a zero header or anything implausible;
    never raises. (Hot during recovery: written for speed.)"""
    if h < RING_START or h + BH_SIZE > ring_end or (h - RING_START) & 7:
        return None
    seqno, ctx, size, flags, store, type_ = _unpack_bh(buf, h)
    end = h + size
    if size < BH_SIZE or size & 7 or end > ring_end or flags > FLAGS_MAX or store != STORE_RB or seqno < -1:
        return None
    if ctx >> 32 == MAGIC32:
        if seqno <= 0:
            return _tuple_new(Probe, (h, seqno, size, flags, store, type_, "none", 0, end))
        pad = buf[end - 1]
        if size == BH_SIZE or not 1 <= pad <= ALIGNMENT:
            return _tuple_new(Probe, (h, seqno, size, flags, store, type_, "bad", 0, end))
        n = size - BH_SIZE - pad
        body = h + BH_SIZE
        crc = _crc32(buf[body:body + n], _crc32(_pack_prefix(seqno, size, flags, store, type_), gcrc))
        ok = "ok" if crc == ctx & 0xFFFFFFFF else "bad"
        return _tuple_new(Probe, (h, seqno, size, flags, store, type_, ok, n, end))
    if ctx == 0 or ctx & 7 or ctx >= POINTER_LIMIT:
        return None
    return _tuple_new(Probe, (h, seqno, size, flags, store, type_, "none", size - BH_SIZE, end))
