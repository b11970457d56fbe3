#!/usr/bin/env python3
"""IST throughput and memory, donor and joiner as separate processes on loopback.

Prints, in one run:

* baseline: the same bytes sent over a plain trio socket pair (two processes, 1 MiB writes), the ceiling
  a Python/trio transfer of these bytes can reach on this machine now;
* transfer only (`--applier none`): 100k and 1M write-sets of 500 bytes, IST rate and its ratio to the
  baseline;
* end to end into SQLite, 100k write-sets: IST rate, and joiner launch -> caught up (process exit); and the
  same for a small catch-up of 5k write-sets (applied in the joiner's own process, without the worker);
* peak RSS of each joiner (and the donor), and the 1M/100k joiner RSS ratio.

The machines are noisy: compare the ratios, not the absolute numbers. Usage:

    python scripts/bench_ist.py                  # 100k and 1M, as in the README
    python scripts/bench_ist.py --counts 100000  # quicker
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASELINE_CHUNK_BYTES = 1 << 20
# The joiner's own gcache: smaller than the 100k gap, so its footprint is the same for every gap size
# and peak RSS shows what the pipeline itself holds (the queue bound and the frame buffers).
JOINER_GCACHE = "gcache.size=32M"


def istd(*args: str) -> list[str]:
    return [sys.executable, "-m", "istd", "--log-format", "json", *args]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def memory(pid: int) -> tuple[int, int]:
    """(peak RSS so far, anonymous RSS now) in bytes from /proc: VmHWM counts the mapped gcache pages too;
    RssAnon is what the process itself holds (heap, queue, buffers)."""
    values = {"VmHWM:": 0, "RssAnon:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values["VmHWM:"], values["RssAnon:"]


def run_waited(cmd: list[str], log_path: Path) -> tuple[int, float, int, int]:
    """Run to completion; returns (exit code, wall seconds, peak RSS, peak anonymous RSS), sampled every 20 ms."""
    start = time.perf_counter()
    peak = peak_anon = 0
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            hwm, anon = memory(proc.pid)
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            peak, peak_anon = max(peak, hwm), max(peak_anon, anon)
            time.sleep(0.02)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, elapsed, peak, peak_anon


def events(log_path: Path) -> list[dict[str, Any]]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


BASELINE_RECEIVER = """
import sys, trio
async def main(port):
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print("ready", flush=True)
    stream, _ = await listeners[0].accept(), None
    total = 0
    while data := await stream.receive_some(1 << 20):
        total += len(data)
    print(total, flush=True)
trio.run(main, int(sys.argv[1]))
"""


def baseline(total_bytes: int) -> float:
    """Seconds to push total_bytes from one process to another over a plain trio socket."""
    import trio

    port = free_port("127.0.0.1")
    receiver = subprocess.Popen([sys.executable, "-c", BASELINE_RECEIVER, str(port)], stdout=subprocess.PIPE,
                                text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    chunk = os.urandom(BASELINE_CHUNK_BYTES)

    async def send() -> float:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = time.perf_counter()
        sent = 0
        while sent < total_bytes:
            n = min(BASELINE_CHUNK_BYTES, total_bytes - sent)
            await stream.send_all(memoryview(chunk)[:n])
            sent += n
        await stream.aclose()
        return start

    start = trio.run(send)
    received = int(receiver.stdout.readline())
    elapsed = time.perf_counter() - start
    receiver.wait()
    assert received == total_bytes
    return elapsed


def sqlite_ceiling(count: int, size: int) -> tuple[float, float]:
    """Write-sets/s of (a) SQLite alone: the already-decoded rows through the applier's own statements, schema,
    settings and checkpoint thread, and (b) istd's applier in one process (decode + the same SQL), on the
    same write-sets."""
    import uuid

    from istd.applier import SqliteApplier, _upsert
    from istd.writeset import decode_rows, synthetic

    payloads = [synthetic(s, size) for s in range(1, count + 1)]
    batch = 2000
    with tempfile.TemporaryDirectory() as d:
        raw = SqliteApplier(Path(d))
        rows = [(s, t, k, v) for s, p in enumerate(payloads, 1) for _, t, k, v in decode_rows(p)]
        conn = raw._require_open()
        start = time.perf_counter()
        for i in range(0, count, batch):
            chunk = rows[i:i + batch]
            conn.execute("BEGIN")
            _upsert(conn, chunk)  # the applier's statements
            conn.execute("COMMIT")
            # the applier's checkpoint thread, as after every apply(): the same WAL handling as istd
            raw._checkpointer.committed(conn, sum(len(r[3]) for r in chunk))
        raw_rate = count / (time.perf_counter() - start)
        raw.close()
    # the apply worker's input: payloads one after the other in one buffer per batch, as in a gcache segment
    runs = []
    for i in range(0, count, batch):
        part = payloads[i:i + batch]
        ends = list(itertools.accumulate(map(len, part)))
        runs.append((i + 1, b"".join(part), [0, *ends[:-1]], ends))
    with tempfile.TemporaryDirectory() as d:
        applier = SqliteApplier(Path(d))
        u = uuid.uuid4()
        start = time.perf_counter()
        for first, buf, starts, ends in runs:
            applier.apply_trx_run(u, first, buf, starts, ends)
        applier_rate = count / (time.perf_counter() - start)
        applier.close()
    return raw_rate, applier_rate


class Bench:
    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.host = "127.0.0.1"

    def prepare_donor(self, count: int) -> tuple[Path, str]:
        datadir = self.root / f"donor-{count}"
        datadir.mkdir()
        ring_mb = max(8, (count * (self.size + 32) * 11 // 10) >> 20)
        subprocess.run(istd("gcache", "fill", str(datadir / "galera.cache"), "--count", str(count), "--size",
                            str(self.size), "--cache-size", f"{ring_mb}M"), check=True, capture_output=True)
        return datadir, f"gcache.size={ring_mb}M"

    def transfer(self, donor_dir: Path, donor_opts: str, count: int, applier: str) -> dict[str, Any]:
        port = free_port(self.host)
        donor_log = self.root / f"donor-{count}-{applier}.log"
        with open(donor_log, "wb") as log:
            donor = subprocess.Popen(
                istd("donor", "--datadir", str(donor_dir), "--applier", "none", "--listen", f"{self.host}:{port}",
                     "--sst-listen", "none", "--api-listen", "none", "--provider-options", donor_opts),
                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not any(e.get("event", "").startswith("IST listener open") for e in events(donor_log)):
                if donor.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"donor did not start:\n{donor_log.read_text()}")
                time.sleep(0.05)
            gid = json.loads(subprocess.run(istd("gcache", "inspect", str(donor_dir / "galera.cache"), "--json"),
                                            capture_output=True, text=True, check=True).stdout)["gid"]
            joiner_dir = self.root / f"joiner-{count}-{applier}"
            subprocess.run(istd("grastate", "set", str(joiner_dir), "--uuid", gid, "--seqno", "0"), check=True,
                           capture_output=True)
            joiner_log = self.root / f"joiner-{count}-{applier}.log"
            code, wall, rss, anon = run_waited(
                istd("joiner", "--datadir", str(joiner_dir), "--donor", f"{self.host}:{port}", "--applier", applier,
                     "--api-listen", "none", "--provider-options", JOINER_GCACHE), joiner_log)
            if code != 0:
                raise SystemExit(f"joiner exited {code}:\n{joiner_log.read_text()[-3000:]}")
            donor_peak, _ = memory(donor.pid)
        finally:
            donor.terminate()
            donor.wait()
        summary = next(e for e in events(joiner_log) if e.get("event", "").startswith("IST complete"))
        shutil.rmtree(joiner_dir)
        return {"count": count, "applier": applier, "ist_seconds": summary["seconds"], "rate": summary["rate"],
                "mb_per_s": summary["mb_per_s"], "launch_to_caught_up": wall, "joiner_rss": rss, "joiner_anon": anon,
                "donor_rss": donor_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="100000,1000000", help="gap sizes for the transfer-only runs")
    parser.add_argument("--size", type=int, default=500, help="write-set bytes")
    parser.add_argument("--sqlite-count", type=int, default=100_000, help="gap for the end-to-end run")
    parser.add_argument("--small-count", type=int, default=5_000,
                        help="gap for a small end-to-end catch-up (applied without the worker process); 0: none")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    root = Path(tempfile.mkdtemp(prefix="istd-bench-"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    # The processes start as an installed istd does, with its modules' bytecode compiled (pip compiles it at
    # install; an environment may forbid writing it next to the sources): a cache of the bench's own.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    subprocess.run([sys.executable, "-c", "import istd.cli, istd.apply_worker, istd.applier, gcache, protocol"],
                   check=True)
    try:
        bench = Bench(root, args.size)
        rows = []
        donors = {}
        small = [args.small_count] if args.small_count else []
        for count in sorted({*counts, args.sqlite_count, *small}):
            donors[count] = bench.prepare_donor(count)
        base_bytes = max(counts) * args.size
        base_s = baseline(base_bytes)
        base_rate = max(counts) / base_s
        sqlite_raw, sqlite_applier = sqlite_ceiling(args.sqlite_count, args.size)
        for count in counts:
            rows.append(bench.transfer(*donors[count], count, "none"))
        for count in (args.sqlite_count, *small):
            rows.append(bench.transfer(*donors[count], count, "sqlite"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nIST benchmark: {args.size}-byte write-sets, donor and joiner as separate processes on loopback")
    print(f"baseline (same bytes over a plain trio socket, 1 MiB writes): {base_bytes / base_s / 1e6:,.0f} MB/s "
          f"= {base_rate:,.0f} write-sets/s\n")
    print(f"SQLite alone (the decoded rows through the applier's statements and schema): {sqlite_raw:,.0f} "
          f"write-sets/s; istd's applier in one process (decode + SQL): {sqlite_applier:,.0f} write-sets/s\n")
    header = (f"{'run':<26} {'write-sets':>10} {'IST s':>7} {'ws/s':>10} {'MB/s':>7} {'x baseline':>10} "
              f"{'launch->caught up s':>19} {'joiner RSS MB':>13} {'(anon MB)':>9} {'donor RSS MB':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        name = "transfer only (none)" if r["applier"] == "none" else "end to end (sqlite)"
        mib = 2**20
        print(f"{name:<26} {r['count']:>10,} {r['ist_seconds']:>7.2f} {r['rate']:>10,} {r['mb_per_s']:>7.1f} "
              f"{r['rate'] / base_rate:>10.2f} {r['launch_to_caught_up']:>19.2f} {r['joiner_rss'] / mib:>13.1f} "
              f"{r['joiner_anon'] / mib:>9.1f} {r['donor_rss'] / mib:>12.1f}")
        if r["applier"] == "sqlite" and r["count"] == args.sqlite_count:
            print(f"{'':<26} end-to-end rate / SQLite alone: {r['rate'] / sqlite_raw:.2f}")
    none_rows = {r["count"]: r for r in rows if r["applier"] == "none"}
    if len(none_rows) >= 2:
        small, large = min(none_rows), max(none_rows)
        ratio = none_rows[large]["joiner_rss"] / none_rows[small]["joiner_rss"]
        anon = none_rows[large]["joiner_anon"] / none_rows[small]["joiner_anon"]
        print(f"\njoiner peak RSS, {large:,} gap / {small:,} gap: {ratio:.2f} (target <= 1.10); "
              f"anonymous memory only: {anon:.2f}")
        print(f"(the joiner's own gcache is {JOINER_GCACHE}: smaller than both gaps, so its mapped pages are "
              "the same for both)")


if __name__ == "__main__":
    main()
