"""Node states as Galera prints them in ``wsrep_local_state`` / ``wsrep_local_state_comment``.

From Galera 4's ``state2stats_str`` (galera/src/replicator_smm_stats.cpp); the numbers are
``wsrep_member_status_t``.
"""

from __future__ import annotations

from enum import Enum


class NodeState(Enum):
    INITIALIZED = (0, "Initialized")
    JOINING_RECEIVING = (1, "Joining: receiving State Transfer")
    JOINING = (1, "Joining")
    REQUEST_FAILED = (0, "Joining: State Transfer request failed")
    TRANSFER_FAILED = (0, "Joining: State Transfer failed")
    DONOR = (2, "Donor/Desynced")
    JOINED = (3, "Joined")
    SYNCED = (4, "Synced")
    INCONSISTENT = (5, "Inconsistent")

    @property
    def number(self) -> int:
        return self.value[0]

    @property
    def comment(self) -> str:
        return self.value[1]

    @property
    def gcs_name(self) -> str:
        """The GCS name used in Galera's ``Shifting A -> B (TO: n)`` lines."""
        return _GCS_NAMES[self]


_GCS_NAMES = {
    NodeState.INITIALIZED: "PRIMARY",
    NodeState.JOINING_RECEIVING: "JOINER",
    NodeState.JOINING: "JOINER",
    NodeState.REQUEST_FAILED: "PRIMARY",
    NodeState.TRANSFER_FAILED: "PRIMARY",
    NodeState.DONOR: "DONOR/DESYNCED",
    NodeState.JOINED: "JOINED",
    NodeState.SYNCED: "SYNCED",
    NodeState.INCONSISTENT: "ERROR",
}
