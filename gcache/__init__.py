"""gcache: Galera 4's write-set cache file (``galera.cache``), synchronous and mmap-based.

Imports only the standard library and ``istd.errors``. To this package a write-set is opaque bytes plus
a seqno and a type. See ``gcache/README.md`` for the file layout, eviction, locking, pages and recovery.
"""

from .cache import GCache, MiB, Record, Segment, segment_payloads, segment_spans, segment_types
from .format import CCHANGE, WRITESET, parse_size
from .recovery import ScanRecord, ScanReport, scan

__all__ = ["CCHANGE", "WRITESET", "GCache", "MiB", "Record", "ScanRecord", "ScanReport", "Segment", "parse_size",
           "scan", "segment_payloads", "segment_spans",
           "segment_types"]
