#!/bin/sh
# Entrypoint of the istd image (see docker-compose.yml):  istd-entrypoint NODE-OPTIONS...
# runs `istd node --datadir /var/lib/istd NODE-OPTIONS...`, after handling a first start.
#
# A data directory that has no grastate.dat has never held state. What it gets then:
#   NEW_CLUSTER=1             this node starts a new cluster: --bootstrap is added. Only on the first start:
#                             a restarted node keeps its saved position and must not start a second history
#                             (Galera's --wsrep-new-cluster, given once).
#   INITIAL_STATE_FROM=H:P    a new member takes the cluster's initial state: it waits for the member whose API
#                             is H:P to be Synced, reads the cluster's uuid, and records the position uuid:0.
#                             An empty state at seqno 0 of that history is exact, and IST brings the rest
#                             (while the donor's gcache still holds seqno 1). This is the stand-in for a full
#                             state transfer (SST), which istd does not do yet.
# A data directory that has grastate.dat is left alone: the node rejoins from its saved position, by IST.
set -eu

DATADIR=/var/lib/istd
WAIT_SECONDS=${INITIAL_STATE_WAIT_SECONDS:-300}

if [ ! -e "$DATADIR/grastate.dat" ]; then
    if [ "${NEW_CLUSTER:-0}" = 1 ]; then
        echo "istd-entrypoint: $DATADIR has no state: bootstrapping a new cluster" >&2
        set -- "$@" --bootstrap
    elif [ -n "${INITIAL_STATE_FROM:-}" ]; then
        echo "istd-entrypoint: $DATADIR has no state: waiting for $INITIAL_STATE_FROM to be Synced" >&2
        waited=0
        until uuid=$(istd status --node "$INITIAL_STATE_FROM" --json 2>/dev/null | python3 -c '
import json, sys
st = json.load(sys.stdin)
if st.get("wsrep_local_state_comment") != "Synced":
    sys.exit(1)
print(st["wsrep_local_state_uuid"])' 2>/dev/null); do
            if [ "$waited" -ge "$WAIT_SECONDS" ]; then
                echo "istd-entrypoint: $INITIAL_STATE_FROM not Synced after ${WAIT_SECONDS}s; giving up" >&2
                exit 3
            fi
            sleep 1
            waited=$((waited + 1))
        done
        echo "istd-entrypoint: starting from the cluster's initial state $uuid:0 (stand-in for SST)" >&2
        istd grastate set "$DATADIR" --uuid "$uuid" --seqno 0 --safe-to-bootstrap 0 >&2
    fi
fi

exec istd node --datadir "$DATADIR" "$@"
