#!/usr/bin/env python3
"""Benchmark gcache appends and range reads against a plain mmap copy of the same bytes.

For each write-set size, in the same run and on the same kind of file:

  append_many   GCache.append_many() in batches of --batch      vs  mm[off:off+n] = payload
  append        GCache.append() one at a time                   vs  mm[off:off+n] = payload
  get_range     GCache.get_range() in batches (memoryviews)     vs  mv[off:off+n] (memoryview slices)
  get_range+copy  bytes() of every payload                      vs  mm[off:off+n] (bytes copies)

Both sides first write the whole data set once (so that page faults of a fresh file are not timed), then
the best of --repeat timed passes is reported. The ring is smaller than the data set when --ring says so,
and then eviction is part of the timed appends. Nothing here asserts anything about timings.

    python scripts/bench_gcache.py [--count 20000] [--size 500,65536] [--ring 64M] [--batch 1000]
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gcache import GCache, parse_size

MAX_BYTES_PER_PASS = 128 << 20  # big write-sets: fewer of them, so that a run stays a few seconds


def best_of(repeat: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_size(size: int, count: int, ring: int, batch: int, repeat: int, workdir: Path) -> list[tuple]:
    count = max(1, min(count, MAX_BYTES_PER_PASS // size))
    payloads = [os.urandom(size) for _ in range(min(count, 64))]
    data = [payloads[k % len(payloads)] for k in range(count)]
    batches = [data[k:k + batch] for k in range(0, count, batch)]
    total = size * count
    rows = []

    # ---- gcache
    path = workdir / f"bench-{size}.cache"
    gc = GCache.open(path, size=ring)
    gc.reset(uuid.uuid4(), 0)
    for b in batches:  # warm-up: fault the file in
        gc.append_many(b)

    def g_append_many() -> None:
        for b in batches:
            gc.append_many(b)

    def g_append() -> None:
        for p in data:
            gc.append(p)

    t_am = best_of(repeat, g_append_many)
    t_a = best_of(repeat, g_append)
    count_read = min(count, gc.statistics()["count"])
    first = gc.seqno_max - count_read + 1
    spans = [(s, min(s + batch, gc.seqno_max + 1) - 1) for s in range(first, gc.seqno_max + 1, batch)]

    def g_read() -> None:
        for a, b in spans:
            recs = gc.get_range(a, b)
            del recs

    def g_read_copy() -> None:
        for a, b in spans:
            _ = [bytes(r.payload) for r in gc.get_range(a, b)]

    t_r = best_of(repeat, g_read)
    t_rc = best_of(repeat, g_read_copy)
    evicted = gc.statistics()["evicted"]
    gc.close()
    path.unlink()

    # ---- baseline: the same bytes copied into a plain mmap of the same size, 8-byte aligned
    bpath = workdir / f"bench-{size}.mmap"
    with open(bpath, "wb") as f:
        f.truncate(ring + 1304)
    with open(bpath, "r+b") as f:
        mm = mmap.mmap(f.fileno(), ring + 1304)
    mv = memoryview(mm)
    step = (size + 32) & -8
    offsets = []
    off = 1280
    for _ in range(count):
        if off + step > ring + 1280:
            off = 1280
        offsets.append(off)
        off += step
    pairs = list(zip(offsets, data, strict=True))

    def b_write() -> None:
        for o, p in pairs:
            mm[o:o + size] = p

    def b_read() -> None:
        for k in range(0, count_read, batch):
            views = [mv[o:o + size] for o in offsets[k:k + batch]]
            del views

    def b_read_copy() -> None:
        for k in range(0, count_read, batch):
            _ = [mm[o:o + size] for o in offsets[k:k + batch]]

    b_write()  # warm-up
    t_bw = best_of(repeat, b_write)
    t_br = best_of(repeat, b_read)
    t_brc = best_of(repeat, b_read_copy)
    mv.release()
    mm.close()
    bpath.unlink()

    read_total = size * count_read
    for op, n, nbytes, tg, tb in [
        ("append_many", count, total, t_am, t_bw),
        ("append", count, total, t_a, t_bw),
        ("get_range", count_read, read_total, t_r, t_br),
        ("get_range+copy", count_read, read_total, t_rc, t_brc),
    ]:
        rows.append((size, op, n, n / tg, nbytes / tg / 1e6, n / tb, nbytes / tb / 1e6, tb / tg))
    rows.append((size, f"(evicted {evicted} write-sets during the timed appends)",))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="write-sets per size and pass (default 20000)")
    ap.add_argument("--size", default="500,65536", help="comma-separated write-set sizes in bytes")
    ap.add_argument("--ring", default="64M", help="gcache.size (default 64M)")
    ap.add_argument("--batch", type=int, default=1000, help="write-sets per append_many/get_range call")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best is reported")
    ap.add_argument("--dir", default=None, help="where to put the files (default: a temporary directory)")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.size.split(",")]
    ring = parse_size(args.ring)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-gcache-") as tmp:
        print(f"gcache.size={ring} bytes, batch={args.batch}, best of {args.repeat}, python {sys.version.split()[0]}")
        head = (f"{'size':>7} {'operation':<15} {'count':>6} {'gcache ws/s':>12} {'MB/s':>8} "
                f"{'mmap ws/s':>12} {'MB/s':>8} {'gcache/mmap':>11}")
        print(head)
        print("-" * len(head))
        for size in sizes:
            for row in bench_size(size, args.count, ring, args.batch, args.repeat, Path(tmp)):
                if len(row) == 2:
                    print(f"{row[0]:>7} {row[1]}")
                    continue
                sz, op, n, gws, gmb, bws, bmb, ratio = row
                print(f"{sz:>7} {op:<15} {n:>6} {gws:>12,.0f} {gmb:>8,.0f} {bws:>12,.0f} {bmb:>8,.0f} "
                      f"{ratio:>11.2f}")


if __name__ == "__main__":
    main()
