"""The receive buffer: bytes in at the back, frames out at the front, in linear time.

A ``bytearray`` whose front is consumed with ``del buf[:n]``: CPython moves the array's logical
start instead of shifting the bytes (``ob_start``), and compacts only when at most half of the
allocation is live, so the total work stays linear in the bytes received (h11's ReceiveBuffer
relies on the same property). Nothing is handed out that aliases the array: ``take()`` returns
``bytes``, so the array may always be resized.
"""

from __future__ import annotations


class ReceiveBuffer:
    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data = bytearray()

    def __len__(self) -> int:
        return len(self._data)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._data += data

    def peek(self, count: int) -> bytes:
        """The first ``count`` bytes, without consuming them."""
        return bytes(self._data[:count])

    def take(self, count: int) -> bytes:
        """Remove and return the first ``count`` bytes (one copy)."""
        if count == len(self._data):
            out = bytes(self._data)
            self._data.clear()
            return out
        with memoryview(self._data) as view:
            out = bytes(view[:count])
        del self._data[:count]
        return out

    def discard(self, count: int) -> None:
        del self._data[:count]
