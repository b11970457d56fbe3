"""istd: Galera-compatible Incremental State Transfer daemons.

This package's ``__init__`` imports nothing on purpose: ``protocol`` and ``gcache`` import
``istd.errors`` (the root of the exception tree) and must not pull in trio by doing so.
"""

__version__ = "0.1.0"
