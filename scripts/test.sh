#!/bin/bash
# Runs corral's whole test suite, as CI does: prepares the host (packages,
# users), then runs every test in release mode. Needs root.
#
# CORRAL_TEST_REQUIRE lists the features this machine must have; a test
# that would skip for lack of one of them fails instead. The default is what
# the project's machines offer (kernel 6.18: Landlock ABI 7). On an older
# kernel, narrow it, e.g. CORRAL_TEST_REQUIRE=root,landlock,seccomp,users.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test-host.sh
export CORRAL_TEST_REQUIRE="${CORRAL_TEST_REQUIRE:-root,landlock,landlock-tcp,landlock-scopes,seccomp,users,python3,bwrap}"
echo "required test features: $CORRAL_TEST_REQUIRE"
cargo test --release --locked
