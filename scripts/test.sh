#!/bin/bash
# Runs corral's whole test suite, as CI does: prepares the host (packages,
# users), boots a real systemd in a private namespace (scripts/sd-ns/ns.sh;
# always powered off at the end, also when a test fails), then runs every
# test in release mode twice over:
#   1. cargo test: the suites in rlimit mode (brokers as plain children) and
#      tests/systemd.rs (the installed corral.service under that systemd);
#   2. the escape, IPC, limit and API suites again with every broker running
#      as a unit of that systemd (CORRAL_TEST_UNDER_SYSTEMD=1).
# Needs root.
#
# CORRAL_TEST_REQUIRE lists the features this machine must have; a test
# that would skip for lack of one of them fails instead. The default is what
# the project's machines offer (kernel 6.18: Landlock ABI 7). On an older
# kernel, narrow it, e.g. CORRAL_TEST_REQUIRE=root,landlock,seccomp,users.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test-host.sh
export CORRAL_TEST_REQUIRE="${CORRAL_TEST_REQUIRE:-root,landlock,landlock-tcp,landlock-scopes,seccomp,users,python3,bwrap,systemd}"
echo "required test features: $CORRAL_TEST_REQUIRE"

# Build first, so the systemd is not kept waiting on the compiler.
cargo test --release --locked --no-run

trap 'scripts/sd-ns/ns.sh stop' EXIT
CORRAL_TEST_SYSTEMD_PID=$(scripts/sd-ns/ns.sh start)
export CORRAL_TEST_SYSTEMD_PID
echo "namespaced systemd: PID $CORRAL_TEST_SYSTEMD_PID"

cargo test --release --locked
CORRAL_TEST_UNDER_SYSTEMD=1 cargo test --release --locked --test escape --test escape_ipc --test limits --test api
