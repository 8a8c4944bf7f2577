#!/bin/bash
# Runs corral's whole test suite, as CI does: prepares the host (packages,
# users), boots a real systemd in a private namespace (scripts/sd-ns/ns.sh;
# always powered off at the end, also when a test fails), then runs every
# test in release mode twice over:
#   1. cargo test: the suites in rlimit mode (brokers as plain children) and
#      tests/systemd.rs (the installed corral.service under that systemd);
#   2. every suite that starts brokers again, with every broker running as
#      a unit of that systemd (CORRAL_TEST_UNDER_SYSTEMD=1);
#   3. all of it once more inside a stock Debian 12 guest under qemu
#      (tests/guest/run.sh: systemd as PID 1, cgroup v2, Landlock ABI 2),
#      with corral installed there as the README says. Listed as the feature
#      "guest"; leave it out of CORRAL_TEST_REQUIRE to skip it (it needs
#      qemu and, the first time, a Debian mirror to build the guest from).
# Needs root.
#
# CORRAL_TEST_REQUIRE lists the features this machine must have; a test
# that would skip for lack of one of them fails instead. The default is what
# the project's machines offer (kernel 6.18: Landlock ABI 7). On an older
# kernel, narrow it, e.g. CORRAL_TEST_REQUIRE=root,landlock,seccomp,users.
set -euo pipefail
cd "$(dirname "$0")/.."
# The shipped binary is built small (Cargo.toml: fat LTO, one codegen unit,
# opt-level "s"), which costs a whole-program link of a minute or more per
# executable. The suites build about a dozen test executables: they keep the
# build they had before (no LTO, 16 codegen units, opt-level 3), and so does
# the corral binary they run. Same code; set these to test the shipped build.
export CARGO_PROFILE_RELEASE_LTO="${CARGO_PROFILE_RELEASE_LTO:-false}"
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS="${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-16}"
export CARGO_PROFILE_RELEASE_OPT_LEVEL="${CARGO_PROFILE_RELEASE_OPT_LEVEL:-3}"
./scripts/setup-test-host.sh
export CORRAL_TEST_REQUIRE="${CORRAL_TEST_REQUIRE:-root,landlock,landlock-tcp,landlock-scopes,seccomp,users,python3,curl,iproute2,bwrap,toolchain,node,npm,openai-client,systemd,guest}"
echo "required test features: $CORRAL_TEST_REQUIRE"

# Build first, so the systemd is not kept waiting on the compiler.
cargo test --release --locked --no-run

trap 'scripts/sd-ns/ns.sh stop' EXIT
# The checkout may live under /tmp (private inside the namespace): keep it visible.
export CORRAL_NS_KEEP=$PWD
CORRAL_TEST_SYSTEMD_PID=$(scripts/sd-ns/ns.sh start)
export CORRAL_TEST_SYSTEMD_PID
echo "namespaced systemd: PID $CORRAL_TEST_SYSTEMD_PID"

cargo test --release --locked
# Not bridge: the Telegram bridge is a client of the socket, the same whether
# the broker runs as a unit or not; its own unit ran under this systemd above.
CORRAL_TEST_UNDER_SYSTEMD=1 cargo test --release --locked --test escape --test escape_ipc --test isolation --test limits --test api \
  --test cancel --test front_door --test faults --test llm --test operations --test pool --test stream --test workspace --test toolchain --test egress --test receipts --test family --test sessions --test members

case ",$CORRAL_TEST_REQUIRE," in
  *,guest,* | *,all,*)
    scripts/sd-ns/ns.sh stop
    trap - EXIT
    tests/guest/run.sh
    ;;
  *) echo "SKIP: the Debian 12 guest suites (tests/guest/run.sh): CORRAL_TEST_REQUIRE does not list guest" ;;
esac

# A test run must leave the machine as it found it. (An install step once
# chmod-ed /dev/null through a masked unit's symlink; catch any repeat.)
if [ "$(stat -c %a /dev/null)" != 666 ]; then
  echo "FAIL: /dev/null is now mode $(stat -c %a /dev/null), not 666: a step of this run changed it" >&2
  exit 1
fi
echo "test.sh: all suites passed"
