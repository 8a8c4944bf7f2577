#!/bin/bash
# The main job: build corral, start the broker with the example policies in
# the background, and make a first sandboxed call. Needs root (workers switch
# to their own users). Stop the broker with: kill "$(cat /run/corral/broker.pid)"
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test-host.sh
cargo build --release --locked
bin=$PWD/target/release/corral
sock=/run/corral/corral.sock
mkdir -p /run/corral /var/lib/corral
"$bin" policy check policies
if [ -s /run/corral/broker.pid ] && kill -0 "$(cat /run/corral/broker.pid)" 2>/dev/null; then
  kill "$(cat /run/corral/broker.pid)"; sleep 0.5
fi
"$bin" broker --policies "$PWD/policies" --socket "$sock" --state-dir /var/lib/corral \
  >/var/lib/corral/broker.log 2>&1 &
echo $! >/run/corral/broker.pid
for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
echo
echo "\$ corral exec shell-tools -- sh -c 'id; echo hello from the sandbox; cat /etc/shadow'"
"$bin" exec shell-tools -- sh -c 'id; echo hello from the sandbox; cat /etc/shadow' || echo "(exit $?)"
echo
"$bin" status
echo
echo "broker running (pid $(cat /run/corral/broker.pid), log /var/lib/corral/broker.log); try:"
echo "  $bin exec shell-tools -- uname -a"
echo "  curl -s --unix-socket $sock -d '{\"workflow\":\"shell-tools\",\"argv\":[\"ls\",\"-la\"]}' http://corral/v1/exec"
