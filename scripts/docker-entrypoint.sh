#!/bin/sh
# Entrypoint of the istd image (see docker-compose.yml):  istd-entrypoint NODE-OPTIONS...
# runs `istd node --datadir /var/lib/istd NODE-OPTIONS...`, after handling a first start.
#
# A data directory that has no grastate.dat has never held state. What it gets then:
#   NEW_CLUSTER=1   this node starts a new cluster: --bootstrap is added. Only on the first start: a restarted
#                   node keeps its saved position and must not start a second history (Galera's
#                   --wsrep-new-cluster, given once).
#   otherwise       nothing special: the node joins with no state, and the cluster gives it a full state
#                   transfer (SST) from a synced member, then IST for what came meanwhile.
# A data directory that has grastate.dat is left alone: the node rejoins from its saved position, by IST
# (or by SST if IST has become impossible).
set -eu

DATADIR=/var/lib/istd

if [ ! -e "$DATADIR/grastate.dat" ] && [ "${NEW_CLUSTER:-0}" = 1 ]; then
    echo "istd-entrypoint: $DATADIR has no state: bootstrapping a new cluster" >&2
    set -- "$@" --bootstrap
fi

exec istd node --datadir "$DATADIR" "$@"
