"""The joiner's apply worker: a child process that applies batches while the parent receives.

Why a process: SQLite releases the GIL for every row it inserts, so an applier *thread* and the receiving
task hand the GIL back and forth hundreds of thousands of times a second and both slow down. A child
process gives apply its own core. The parent keeps the gcache, the network and the status; the child
owns the state database's writes for the duration of the join.

Pipe protocol (parent -> child on stdin, child -> parent on stdout, little-endian)::

    request:  u32 body_len | i64 first | u32 count | u8 kind | body
              kind 0 (a BATCH):   u8[count] types | u32[count] sizes | data
              kind 1 (a SEGMENT): gcache records as they lie on disk (gcache.segment_spans finds the payloads)
    reply:    i64 last_applied                                  (>= 0: the batch is committed)
              i64 -1 | u32 len | utf-8 message                  (the batch failed; nothing of it committed)

``apply_segment`` and ``apply_batch`` are what the child does with a request; the joiner calls them itself,
in a thread, for a catch-up too small to be worth starting the child (istd/joiner.py).

The child applies each batch in one transaction that also records the position (istd/applier.py), so a
crash of either process leaves data and position in agreement. It ignores SIGINT (the parent decides when
to stop) and exits when its stdin closes, after finishing the transaction it is in. It inherits the data
directory lock, so a new daemon cannot start on the directory while it is still finishing.
"""

from __future__ import annotations

import signal
import struct
import sys
import uuid
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from gcache import CCHANGE, WRITESET, segment_spans, segment_types
from istd.applier import RECORD_CCHANGE, RECORD_TRX, Applier, open_applier
from istd.errors import IstError

REQUEST = struct.Struct("<IqIB")
KIND_BATCH = 0
KIND_SEGMENT = 1
REPLY = struct.Struct("<q")
ERROR_LEN = struct.Struct("<I")
# gcache's record types as the applier's (as istd/node.py maps them): a CCHANGE only advances the position
_RECORD_TYPES = bytes(RECORD_CCHANGE if t == CCHANGE else RECORD_TRX for t in range(256))


def encode_request(first: int, types: bytes, sizes: bytes, data: bytes | memoryview) -> list[bytes | memoryview]:
    body_len = REQUEST.size - 4 + len(types) + len(sizes) + len(data)
    return [REQUEST.pack(body_len, first, len(types), KIND_BATCH), types, sizes, data]


def encode_segment_request(first: int, count: int, blob: bytes | memoryview) -> list[bytes | memoryview]:
    return [REQUEST.pack(REQUEST.size - 4 + len(blob), first, count, KIND_SEGMENT), blob]


def apply_segment(applier: Applier, cluster_uuid: uuid.UUID, first: int, count: int, raw: bytes) -> None:
    """Apply the ``count`` records of a raw gcache segment, seqnos from ``first``. IstError if they cannot
    be applied (nothing of them is committed then)."""
    starts, ends = segment_spans(raw)
    if len(starts) != count:
        raise IstError(f"a segment of {len(starts)} write-sets was announced as {count}")
    types = segment_types(raw, starts)
    run = getattr(applier, "apply_trx_run", None)
    if run is not None and types.count(WRITESET) == count:
        run(cluster_uuid, first, raw, starts, ends)  # no view or tuple per write-set
        return
    types = types.translate(_RECORD_TYPES)
    view = memoryview(raw)
    applier.apply(cluster_uuid, [(first + i, types[i], view[a:b])
                                 for i, (a, b) in enumerate(zip(starts, ends, strict=True))])


def apply_batch(applier: Applier, cluster_uuid: uuid.UUID, first: int, types: bytes, sizes: Sequence[int],
                data: bytes | memoryview) -> None:
    """Apply a BATCH: write-set ``i`` has type ``types[i]`` and ``sizes[i]`` bytes, the payloads one after the
    other in ``data``. IstError as apply_segment."""
    view = memoryview(data)
    records = []
    pos = 0
    for i, size in enumerate(sizes):
        records.append((first + i, types[i], view[pos:pos + size]))
        pos += size
    applier.apply(cluster_uuid, records)


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def serve(datadir: Path, applier_name: str, cluster_uuid: uuid.UUID, stdin: BinaryIO, stdout: BinaryIO) -> int:
    applier = open_applier(applier_name, datadir)
    try:
        while True:
            head = _read_exact(stdin, REQUEST.size)
            if head is None:
                return 0
            body_len, first, count, kind = REQUEST.unpack(head)
            body = _read_exact(stdin, body_len - (REQUEST.size - 4))
            if body is None:
                return 0
            try:
                if kind == KIND_SEGMENT:
                    apply_segment(applier, cluster_uuid, first, count, body)
                else:
                    sizes = array("I")
                    sizes.frombytes(body[count:count * 5])
                    apply_batch(applier, cluster_uuid, first, body[:count], sizes, memoryview(body)[count * 5:])
            except IstError as exc:
                message = str(exc).encode("utf-8", "replace")
                stdout.write(REPLY.pack(-1) + ERROR_LEN.pack(len(message)) + message)
                stdout.flush()
                continue
            stdout.write(REPLY.pack(first + count - 1))
            stdout.flush()
    finally:
        applier.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent closes our stdin when it stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        datadir, applier_name, cluster_uuid = sys.argv[1], sys.argv[2], uuid.UUID(sys.argv[3])
        code = serve(Path(datadir), applier_name, cluster_uuid, sys.stdin.buffer, sys.stdout.buffer)
    except Exception as exc:  # one line for the parent's log, never a traceback on the operator's terminal
        sys.stderr.write(f"istd apply worker: {type(exc).__name__}: {exc}\n")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
