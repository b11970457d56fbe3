"""gcache against a dict model: random appends, batches, locks, reads, history truncation, clean and
crashed reopens, in a ring a few buffers long with small overflow pages.

What must hold after every step: the cached range is gapless and every cached write-set is exactly what
was appended under that seqno; nothing at or above the lowest lock is ever evicted; the newest write-set
is always cached (until a reopen, which loses only what lived in pages).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gcache import CCHANGE, WRITESET, GCache
from istd.errors import SeqnoNotInCache

GID = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")
RING = 2048
PAGE = 1024
SIZES = st.integers(0, 300) | st.sampled_from([0, 7, 8, 1000, 1100])  # 1000+ are > half the ring


def data_for(seqno: int, n: int, salt: int) -> bytes:
    return bytes((seqno * 31 + salt + k) % 256 for k in range(n))



class GcacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="gcache-model-"))
        self.path = self.dir / "galera.cache"
        self.keep = 0
        self.gc = self._open()
        self.gc.reset(GID, 0)
        self.model: dict[int, tuple[int, bool, bytes]] = {}
        self.locks: list[int] = []
        self.last = 0
        self.expect_max = -1  # the newest cached seqno we expect
        self.salt = 0

    def _open(self) -> GCache:
        return GCache.open(self.path, size=RING, page_size=PAGE, keep_pages_size=self.keep)

    def teardown(self) -> None:
        if not self.gc.closed:
            self.gc.abandon()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ writes

    def _payload(self, seqno: int, n: int) -> bytes:
        self.salt += 1
        return data_for(seqno, n, self.salt)

    @rule(n=SIZES, type_=st.sampled_from([WRITESET, CCHANGE]), skipped=st.booleans())
    def append(self, n: int, type_: int, skipped: bool) -> None:
        s = self.gc.next_seqno
        data = self._payload(s, n)
        assert self.gc.append(data, type_, skipped=skipped) == s == self.last + 1
        self.model[s] = (type_, skipped, data)
        self.last = self.expect_max = s

    @rule(ns=st.lists(SIZES, max_size=12), cchange=st.booleans())
    def append_many(self, ns: list[int], cchange: bool) -> None:
        s0 = self.gc.next_seqno
        datas = [self._payload(s0 + k, n) for k, n in enumerate(ns)]
        types = bytes(CCHANGE if cchange and k % 3 == 0 else WRITESET for k in range(len(ns)))
        assert self.gc.append_many(datas, types, first=s0) == (s0, s0 + len(ns) - 1)
        for k, d in enumerate(datas):
            self.model[s0 + k] = (types[k], False, d)
        self.last = s0 + len(ns) - 1
        if ns:
            self.expect_max = self.last

    @precondition(lambda self: self.gc.seqno_max > 0)
    @rule(data=st.data())
    def truncate_history(self, data: st.DataObject) -> None:
        """reset() to the same GID at an older position, as after a restart from grastate.dat."""
        lo = max(self.locks, default=self.gc.seqno_min - 1)
        s = data.draw(st.integers(max(lo, self.gc.seqno_min - 1), self.gc.seqno_max))
        smin = self.gc.seqno_min
        self.gc.reset(GID, s)
        self.model = {k: v for k, v in self.model.items() if k <= s}
        self.last = s
        self.expect_max = s if s >= smin else -1

    # ------------------------------------------------------------------ locks

    @precondition(lambda self: self.gc.seqno_min > 0 and len(self.locks) < 4)
    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        s = data.draw(st.integers(self.gc.seqno_min, self.gc.seqno_max))
        self.gc.lock(s)
        self.locks.append(s)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(self.locks))
        self.locks.remove(s)
        self.gc.unlock(s)
        # trimming pages (keep_pages_size) evicts everything up to a page's last seqno, maybe the newest
        assert self.gc.seqno_max in (self.expect_max, -1)
        self.expect_max = self.gc.seqno_max

    @rule(keep=st.sampled_from([0, 4096]))
    def set_keep_pages_size(self, keep: int) -> None:
        self.keep = keep  # takes effect at the next reopen
        self.gc._keep_pages_size = keep

    # ------------------------------------------------------------------ reads

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        lo, hi = self.gc.seqno_min, self.gc.seqno_max
        s = data.draw(st.integers(max(lo, 1) - 2, max(hi, 0) + 2))
        if lo <= s <= hi and lo > 0:
            r = self.gc.get(s)
            assert (r.seqno, r.type, r.skipped, bytes(r.payload)) == (s, *self.model[s])
        else:
            with pytest.raises(SeqnoNotInCache):
                self.gc.get(s)

    @precondition(lambda self: self.gc.seqno_min > 0)
    @rule(data=st.data())
    def get_range(self, data: st.DataObject) -> None:
        lo, hi = self.gc.seqno_min, self.gc.seqno_max
        a = data.draw(st.integers(lo - 1, hi))
        b = data.draw(st.integers(a, hi + 1))
        if a < lo or b > hi:
            with pytest.raises(SeqnoNotInCache):
                self.gc.get_range(a, b)
        else:
            got = [(r.seqno, r.type, r.skipped, bytes(r.payload)) for r in self.gc.get_range(a, b)]
            assert got == [(s, *self.model[s]) for s in range(a, b + 1)]

    # ------------------------------------------------------------------ restarts

    def _after_reopen(self, before: tuple[int, int], had_pages: bool) -> None:
        self.locks = []
        gc = self.gc
        if not had_pages:
            assert (gc.seqno_min, gc.seqno_max) == before
        else:
            assert gc.seqno_max <= before[1]
            assert gc.seqno_min < 0 or gc.seqno_min >= before[0]
        self.check_contents()
        if gc.seqno_max < 0:
            gc.reset(GID, self.last)  # what the daemon does with grastate's position
            self.model.clear()
        else:
            self.model = {k: v for k, v in self.model.items() if gc.seqno_min <= k <= gc.seqno_max}
            self.last = gc.seqno_max
        self.expect_max = gc.seqno_max

    @rule()
    def reopen_clean(self) -> None:
        before = (self.gc.seqno_min, self.gc.seqno_max)
        had_pages = self.gc.statistics()["pages_created"] > 0
        self.gc.close()
        self.gc = self._open()
        self._after_reopen(before, had_pages)

    @rule()
    def reopen_after_crash(self) -> None:
        before = (self.gc.seqno_min, self.gc.seqno_max)
        had_pages = self.gc.statistics()["pages_created"] > 0
        self.gc.abandon()
        self.gc = self._open()
        self._after_reopen(before, had_pages)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def check_contents(self) -> None:
        gc = self.gc
        if gc.seqno_min < 0:
            assert gc.seqno_max == -1 and len(gc) == 0
            return
        recs = gc.get_range(gc.seqno_min, gc.seqno_max)
        assert [r.seqno for r in recs] == list(range(gc.seqno_min, gc.seqno_max + 1))
        for r in recs:
            assert (r.type, r.skipped, bytes(r.payload)) == self.model[r.seqno]

    @invariant()
    def newest_is_cached(self) -> None:
        assert self.gc.seqno_max == self.expect_max
        assert self.gc.next_seqno == self.last + 1

    @invariant()
    def locks_pin(self) -> None:
        if self.locks:
            assert self.gc.seqno_locked == min(self.locks)
            assert 0 < self.gc.seqno_min <= min(self.locks)
        else:
            assert self.gc.seqno_locked is None

    @invariant()
    def ring_accounting(self) -> None:
        st_ = self.gc.statistics()
        assert 0 <= st_["ring_used"] <= RING and st_["ring_used"] + st_["ring_free"] == RING
        assert st_["count"] == len(self.gc)


GcacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_gcache_model = GcacheMachine.TestCase
