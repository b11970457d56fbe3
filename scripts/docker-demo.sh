#!/usr/bin/env bash
# istd's three-node cluster in Docker, end to end, checked: node3 is stopped, misses writes, and comes back by
# IST; the three applied states must then be equal. Prints one `docker-demo: PASS` or `docker-demo: FAIL` line
# and exits non-zero on failure.
#
# Runs as root on Debian 12 (CI: tests/test_docker_demo.py). Needs Debian's and PyPI's package registries and
# no container registry:
#   1. installs docker.io, debootstrap and nftables with apt-get when missing; compose v2 is Debian 13's
#      docker-compose package unpacked as a CLI plugin in a private DOCKER_CONFIG (fallback: compose v1);
#   2. reuses a running Docker engine, or starts its own dockerd and stops it at exit, undoing what that
#      dockerd left on the host (docker0, its nft tables, ip_forward);
#   3. builds a stand-in for python:3.11-slim from Debian packages (debootstrap, once per engine) that trusts
#      this machine's CA bundle (TLS may go through an intercepting proxy), then the istd image on it;
#   4. docker compose up, load, stop node3, more load, start node3, checks, docker compose down -v.
# Every step has a time limit. A second run reuses the packages, the plugin and the images.
#
# Environment: BASE_IMAGE=IMAGE skips step 3's stand-in (e.g. python:3.11-slim where a registry is reachable);
# FORCE_COMPOSE_V1=1; DOCKER_DEMO_STEP_TIMEOUT (seconds, default 300) for each wait of the story.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-istd-demo}
export ISTD_IMAGE=${ISTD_IMAGE:-local/istd:demo}
STANDIN_IMAGE=local/python:3.11           # BASE_IMAGE unless given
DEBIAN_IMAGE=local/debian-python:bookworm # debootstrap output, the stand-in's parent
LABEL=io.istd.docker-demo=1               # on every image this script builds (old ones are pruned)
COUNT=20000                               # writes while all three nodes run
MORE=10000                                # writes while node3 is stopped
SIZE=200
STEP_TIMEOUT=${DOCKER_DEMO_STEP_TIMEOUT:-300}
NODES=(node1 node2 node3)

WORK=$(mktemp -d -t istd-docker-demo.XXXXXX)
COMPOSE=()
DOCKERD_PID=""
UP=""
REASON="interrupted"
PASSED=""
declare -A HOST_BEFORE=()

log() { printf '[docker-demo %4ds] %s\n' "$SECONDS" "$*"; }
fail() { REASON=$*; exit 1; }
compose() { timeout --kill-after=10 "$STEP_TIMEOUT" "${COMPOSE[@]}" "$@"; }

# ---------------------------------------------------------------------------------------------- cleanup
restore_host() {
    # Only what the dockerd this script started created: docker.md, "What dockerd leaves on the host".
    if [ "${HOST_BEFORE[docker0]}" = 0 ] && ip link show docker0 >/dev/null 2>&1; then
        ip link del docker0
    fi
    local t
    for t in "ip filter" "ip nat" "ip6 filter" "ip6 nat"; do
        if [ "${HOST_BEFORE[$t]}" = 0 ] && nft list table $t >/dev/null 2>&1; then
            nft delete table $t
        fi
    done
    sysctl -q -w "net.ipv4.ip_forward=${HOST_BEFORE[ip_forward]}"
    log "host restored (docker0, nft tables, ip_forward as they were)"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$UP" ]; then
        if [ "$rc" -ne 0 ]; then
            log "the nodes' last log lines:"
            timeout 60 "${COMPOSE[@]}" logs --no-color --tail 40
        fi
        log "docker compose down -v"
        timeout 120 "${COMPOSE[@]}" down -v --remove-orphans -t 10 >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then kill -KILL "$DOCKERD_PID"; sleep 1; fi
        log "dockerd $DOCKERD_PID stopped"
        restore_host
    fi
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ] && [ -n "$PASSED" ]; then
        echo "docker-demo: PASS: $PASSED (${SECONDS}s)"
    else
        [ "$rc" -ne 0 ] || rc=1
        echo "docker-demo: FAIL: $REASON (${SECONDS}s)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'REASON="stopped by a signal"; exit 143' INT TERM

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and may start dockerd)"
command -v apt-get >/dev/null || fail "needs apt-get (Debian)"

# ---------------------------------------------------------------------------------------------- 1. packages
apt_get() { DEBIAN_FRONTEND=noninteractive timeout --kill-after=10 900 apt-get -q -o Dpkg::Use-Pty=0 "$@"; }
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v nft >/dev/null || need+=(nftables)   # to undo what our dockerd adds to the firewall
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt_get update >"$WORK/apt.log" 2>&1 && apt_get install -y "${need[@]}" >>"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log"; fail "apt-get install ${need[*]}"; }
fi
# The Debian mirror apt already uses (read here, never written down).
MIRROR=$(apt-get indextargets --format '$(SITE)' 'Identifier: Packages' 'Release: bookworm' | head -n1)
[ -n "$MIRROR" ] || MIRROR=$(apt-get indextargets --format '$(SITE)' 'Identifier: Packages' | grep -v security | head -n1)
[ -n "$MIRROR" ] || fail "no Debian mirror in apt's sources"

# compose v2 (Debian 12 has only v1): Debian 13's package, unpacked as a CLI plugin in a private config dir.
if [ "${FORCE_COMPOSE_V1:-}" != 1 ] && ! docker compose version >/dev/null 2>&1; then
    export DOCKER_CONFIG=${TMPDIR:-/tmp}/istd-docker-cli
    if ! docker compose version >/dev/null 2>&1; then
        log "fetching compose v2 (Debian 13's docker-compose package) into $DOCKER_CONFIG/cli-plugins"
        A=$WORK/apt
        mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/parts" "$A/dl"
        echo "deb $MIRROR trixie main" >"$A/sources.list"
        APTO=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/parts"
              -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o APT::Sandbox::User=root)
        if apt_get "${APTO[@]}" update >"$WORK/apt-trixie.log" 2>&1 \
           && (cd "$A/dl" && apt_get "${APTO[@]}" download docker-compose >>"$WORK/apt-trixie.log" 2>&1); then
            dpkg-deb -x "$A"/dl/docker-compose_*.deb "$A/x"
            install -D -m755 "$A/x/usr/libexec/docker/cli-plugins/docker-compose" \
                "$DOCKER_CONFIG/cli-plugins/docker-compose"
        else
            tail -5 "$WORK/apt-trixie.log"
        fi
    fi
fi
if [ "${FORCE_COMPOSE_V1:-}" != 1 ] && docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    if ! command -v docker-compose >/dev/null; then
        log "apt-get install docker-compose (compose v1)"
        apt_get install -y docker-compose >>"$WORK/apt.log" 2>&1 || fail "no compose v2, and compose v1 did not install"
    fi
    COMPOSE=(docker-compose)
fi
log "compose: $("${COMPOSE[@]}" version | head -n1)"

# ---------------------------------------------------------------------------------------------- 2. engine
if docker info >/dev/null 2>&1; then
    log "reusing the running Docker engine"
else
    HOST_BEFORE[docker0]=0
    ip link show docker0 >/dev/null 2>&1 && HOST_BEFORE[docker0]=1
    for t in "ip filter" "ip nat" "ip6 filter" "ip6 nat"; do
        HOST_BEFORE[$t]=0
        # shellcheck disable=SC2086
        nft list table $t >/dev/null 2>&1 && HOST_BEFORE[$t]=1
    done
    HOST_BEFORE[ip_forward]=$(cat /proc/sys/net/ipv4/ip_forward)
    # its own session: a Ctrl-C on the terminal reaches this script, which then stops dockerd in order
    setsid dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -30 "$WORK/dockerd.log"; fail "dockerd did not start"; }
    log "dockerd started, pid $DOCKERD_PID"
fi
log "engine: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"

# ---------------------------------------------------------------------------------------------- 3. images
if [ -z "${BASE_IMAGE:-}" ]; then
    export BASE_IMAGE=$STANDIN_IMAGE
    if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
        log "debootstrap bookworm with python3 -> $DEBIAN_IMAGE"
        timeout --kill-after=10 900 debootstrap --variant=minbase \
            --include=ca-certificates,python3,python3-pip,python-is-python3 \
            bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        tar -C "$WORK/rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
            - "$DEBIAN_IMAGE" >/dev/null || fail "docker import"
        rm -rf "$WORK/rootfs"
    fi
    # Every run (a cache hit when nothing changed): trust this machine's CA bundle, never written down.
    CA=${SSL_CERT_FILE:-}
    [ -f "$CA" ] || CA=$(openssl version -d 2>/dev/null | sed -E 's/^OPENSSLDIR: "(.*)"$/\1/')/cert.pem
    [ -f "$CA" ] || CA=/etc/ssl/certs/ca-certificates.crt
    mkdir -p "$WORK/base"
    cp -L "$CA" "$WORK/base/host-ca-bundle.crt"
    cat >"$WORK/base/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
COPY host-ca-bundle.crt /usr/local/share/ca-certificates/host-ca-bundle.crt
# like python:3.11-slim: pip installs into the system as root (no PEP 668 marker)
RUN update-ca-certificates >/dev/null 2>&1 && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
ENV PYTHONUNBUFFERED=1
CMD ["python3"]
EOF
    DOCKER_BUILDKIT=0 timeout 300 docker build --label "$LABEL" -t "$BASE_IMAGE" "$WORK/base" >"$WORK/base.log" 2>&1 \
        || { tail -20 "$WORK/base.log"; fail "building $BASE_IMAGE"; }
fi
log "base image: $BASE_IMAGE"
log "docker build $ISTD_IMAGE (pip install . from PyPI)"
DOCKER_BUILDKIT=0 timeout --kill-after=10 900 docker build --label "$LABEL" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -t "$ISTD_IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "docker build"; }
docker image prune -f --filter "label=$LABEL" >/dev/null 2>&1 || true   # this script's superseded images
log "image $ISTD_IMAGE: $(docker run --rm --entrypoint istd "$ISTD_IMAGE" --version)"

# ---------------------------------------------------------------------------------------------- 4. the story
cd "$ROOT"
compose config -q || fail "docker-compose.yml is not valid"
compose down -v --remove-orphans -t 10 >/dev/null 2>&1 || true   # what an interrupted run may have left
UP=1
log "docker compose up -d: node1 bootstraps, node2 and node3 start from its initial state"
compose up -d --no-build || fail "docker compose up"

container() { "${COMPOSE[@]}" ps -q "$1"; }

wait_healthy() {
    local deadline=$((SECONDS + STEP_TIMEOUT)) n h
    for n in "$@"; do
        until h=$(docker inspect -f '{{.State.Health.Status}}' "$(container "$n")" 2>/dev/null) && [ "$h" = healthy ]; do
            [ "$SECONDS" -lt "$deadline" ] || fail "$n not healthy after ${STEP_TIMEOUT}s (health: ${h:-none})"
            sleep 1
        done
    done
    log "healthy: $*"
}

# One line for the cluster, read from every node's API inside node1: node1=Synced:20000 node2=... node3=down
cluster_view() {
    timeout 30 "${COMPOSE[@]}" exec -T node1 python3 -c '
import json, urllib.request
out = []
for n in ("node1", "node2", "node3"):
    try:
        st = json.load(urllib.request.urlopen(f"http://{n}:4580/status", timeout=3))
        out.append("%s=%s:%s" % (n, st["wsrep_local_state_comment"], st["wsrep_last_committed"]))
    except Exception:
        out.append(n + "=down")
print(" ".join(out))'
}

wait_synced_at() {
    local want="node1=Synced:$1 node2=Synced:$1 node3=Synced:$1" deadline=$((SECONDS + STEP_TIMEOUT)) view=""
    until view=$(cluster_view 2>/dev/null) && [ "$view" = "$want" ]; do
        [ "$SECONDS" -lt "$deadline" ] || fail "not all Synced at $1 after ${STEP_TIMEOUT}s: ${view:-no answer}"
        sleep 1
    done
    log "all three Synced at seqno $1"
}

load() {
    log "istd load --count $1 on node1"
    compose exec -T node1 istd load --node node1:4580 --count "$1" --size "$SIZE" || fail "istd load"
}

wait_healthy "${NODES[@]}"
compose exec -T node1 istd status --node node1:4580 --node node2:4580 --node node3:4580 || true
load "$COUNT"
wait_synced_at "$COUNT"

log "docker compose stop node3"
node3=$(container node3)
compose stop -t 30 node3 || fail "docker compose stop node3"
code=$(docker inspect -f '{{.State.ExitCode}}' "$node3")
[ "$code" = 0 ] || fail "node3 exited $code on SIGTERM (expected a clean stop, 0)"
log "node3 stopped cleanly (exit 0): its volume keeps its position, seqno $COUNT"
load "$MORE"

log "docker compose start node3: it rejoins from seqno $COUNT by IST"
compose start node3 || fail "docker compose start node3"
wait_synced_at $((COUNT + MORE))
wait_healthy node3
compose exec -T node1 istd status --node node1:4580 --node node2:4580 --node node3:4580 || true

log "node3's log: the IST lines"
compose logs --no-color node3 >"$WORK/node3.raw" 2>&1 || fail "docker compose logs node3"
sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$WORK/node3.raw" >"$WORK/node3.log"   # compose v2's terminal codes
grep -E 'requested state transfer|Receiving IST:|IST received:|IST complete:' "$WORK/node3.log" | cut -c1-160 || true
grep -qF 'Receiving IST:' "$WORK/node3.log" || fail "node3's log has no 'Receiving IST:' line"
grep -qF 'IST received:' "$WORK/node3.log" || fail "node3's log has no 'IST received:' line"

log "istd state digest /var/lib/istd in each container"
digests=()
for n in "${NODES[@]}"; do
    out=$(compose exec -T "$n" istd state digest /var/lib/istd) || fail "istd state digest on $n"
    out=$(echo "$out" | tr -s ' \n' ' ' | sed 's/ $//')   # position: UUID:SEQNO digest: HEX
    printf '  %s: %s\n' "$n" "$out"
    digests+=("$out")
done
[ "${digests[0]}" = "${digests[1]}" ] && [ "${digests[0]}" = "${digests[2]}" ] || fail "the three digests differ"
case "${digests[0]}" in "position: "*":$((COUNT + MORE)) digest: "*) ;; *) fail "position is not seqno $((COUNT + MORE))";; esac

PASSED="node3 came back by IST; node1, node2, node3 equal at seqno $((COUNT + MORE))"
