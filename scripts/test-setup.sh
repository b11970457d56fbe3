#!/usr/bin/env bash
# Installs what the test suite needs: the package with its test extras, and (as root, when missing) the
# Debian packages of the multi-host tests (iproute2: network namespaces, veth, tc).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -e '.[test]'
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v ip >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2
fi
