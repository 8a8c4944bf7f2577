#!/bin/bash
# Runs inside the Debian 12 guest, as root, from tests/guest/run.sh:
#
#   inside.sh REPO NAME=TEST-EXECUTABLE...
#
# REPO is the repository's path on the build host; the binary, the test
# executables, units/, policies/ and scripts/ are at the same paths here.
# Sets the host up as a user would (scripts/setup-test-host.sh, then
# scripts/install.sh --start as the README says), prints corral doctor,
# policy check and status, and runs every test executable in rlimit mode and
# in systemd mode (each test broker a unit of this guest's systemd, PID 1;
# tests/systemd.rs, which drives units anyway, only once).
# Prints one SUMMARY line per executable and mode; exits 1 if any failed.
set -uo pipefail
repo=$1; shift
# A checkout from under /tmp on the build host was copied to /srv/corral-guest:
# bind it back where the test executables expect it.
if [ -n "${CORRAL_GUEST_BIND_FROM:-}" ]; then
  mkdir -p "$repo" && mount --bind "$CORRAL_GUEST_BIND_FROM" "$repo" || exit 1
fi
cd "$repo" || exit 1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Landlock ABI 2: no TCP rules (landlock-tcp), no scopes (landlock-scopes);
# no npm (see debian-guest.sh: packages).
export CORRAL_TEST_REQUIRE=${CORRAL_GUEST_REQUIRE:-root,landlock,seccomp,users,python3,curl,iproute2,bwrap,toolchain,node,systemd}
section() { printf '\n===== %s =====\n' "$*"; }
failed=0 summary=()

# The load and fuzz cases of tests/front_door.rs at a size the emulated CPUs
# finish in minutes (the host runs them at full size in both modes).
export CORRAL_TEST_LOAD_CALLS=${CORRAL_GUEST_LOAD_CALLS:-2000}
export CORRAL_TEST_FUZZ_BODIES=${CORRAL_GUEST_FUZZ_BODIES:-1000}
# Connections close and are refused slower there: at concurrency 128 a
# client's next connection can still find its uid at the cap (128), and an
# attack's answers need longer to arrive.
export CORRAL_TEST_LOAD_MAX_CONCURRENCY=${CORRAL_GUEST_LOAD_MAX_CONCURRENCY:-64}
export CORRAL_TEST_ATTACK_SETTLE=${CORRAL_GUEST_ATTACK_SETTLE:-8}
# tests/toolchain.rs: ensurepip (installing and byte-compiling pip and
# setuptools into a venv) takes minutes on the emulated CPUs; the venv is
# made without it there and pip runs from the wheel ensurepip would install.
export CORRAL_TEST_VENV_WITHOUT_ENSUREPIP=${CORRAL_GUEST_VENV_WITHOUT_ENSUREPIP:-1}

section "guest: $(uname -r), $(stat -fc %T /sys/fs/cgroup), PID 1 $(cat /proc/1/comm), $(nproc) CPUs"
echo "required test features: $CORRAL_TEST_REQUIRE"

section "scripts/setup-test-host.sh --no-build"
scripts/setup-test-host.sh --no-build || { echo "SUMMARY setup: FAILED"; exit 1; }

section "scripts/install.sh --binary target/release/corral --start"
if ! scripts/install.sh --binary target/release/corral --start; then
  systemctl status corral.service --no-pager || true
  journalctl -u corral.service --no-pager -n 50 || true
  echo "SUMMARY install: FAILED"
  exit 1
fi
systemctl is-active corral.socket corral.service

section "corral doctor --policies /etc/corral/policies"
corral doctor --policies /etc/corral/policies
echo "(doctor exit $?)"
section "corral policy check /etc/corral/policies"
corral policy check /etc/corral/policies
echo "(policy check exit $?)"
section "corral status"
corral status
echo "(status exit $?)"
corral exec shell-tools -- sh -c 'id; echo hello from the sandbox; cat /etc/shadow'
echo "(exec exit $?)"
systemctl reload corral.service && corral status >/dev/null && echo "reloaded, still serving"

# tests/systemd.rs installs the same units with the same script below /run
# (install.sh --runtime) and changes their policies and drop-ins; a copy in
# /etc/systemd/system would shadow that one. Take the operator's install
# down now that it has been checked (the binary stays).
section "stopping the installed corral.service; the suites install their own"
systemctl disable --now corral.socket corral.service 2>&1
rm -f /etc/systemd/system/corral.service /etc/systemd/system/corral.socket /etc/systemd/system/corral.slice \
  /etc/systemd/system/corral-bridge-telegram.service
systemctl daemon-reload

# The tests' scratch directories live in CARGO_TARGET_TMPDIR (target/tmp).
mkdir -p target/tmp

# One test at a time: the guest's two CPUs are emulated (qemu TCG, several
# times slower than the host), and two tests side by side (a fork bomb next
# to a memory hog) overrun the tests' own 2 s and 10 s call budgets.
run() { # MODE NAME EXE [ENV...]
  local mode=$1 name=$2 exe=$3; shift 3
  section "$name ($mode mode)"
  local log=/var/tmp/test-$name-$mode.log start=$SECONDS
  env "$@" timeout 900 "$exe" --test-threads=1 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local line
  line=$(grep -a '^test result:' "$log" | tail -1)
  [ -n "$line" ] || line="no result (exit $rc)"
  summary+=("SUMMARY $mode $name: $line ($((SECONDS - start)) s)")
  [ "$rc" = 0 ] || failed=1
}
# PID 1 is the systemd the tests drive (tests/systemd.rs: the installed
# corral.service; systemd mode: every test broker as a unit of it).
export CORRAL_TEST_SYSTEMD_PID=1
for t in "$@"; do
  run rlimit "${t%%=*}" "${t#*=}"
done
for t in "$@"; do
  # tests/systemd.rs drives units whatever the mode: once is enough.
  [ "${t%%=*}" = systemd ] && continue
  # The front door is the same code in both modes and had its full load
  # and fuzzing in the first pass: a quarter of them here (CI time).
  run systemd "${t%%=*}" "${t#*=}" CORRAL_TEST_UNDER_SYSTEMD=1 \
    CORRAL_TEST_LOAD_CALLS=$((CORRAL_TEST_LOAD_CALLS / 4)) CORRAL_TEST_FUZZ_BODIES=$((CORRAL_TEST_FUZZ_BODIES / 4))
done

section "summary"
printf '%s\n' "${summary[@]}"
systemctl is-active corral.service >/dev/null || { echo "corral.service is no longer active"; systemctl status corral.service --no-pager; failed=1; }
exit $failed
