#!/bin/bash
# Runs corral's end-to-end suites inside a stock Debian 12 guest (systemd as
# PID 1, cgroup v2, kernel 6.1 = Landlock ABI 2) under qemu. Needs root.
#
#   tests/guest/run.sh [--cache DIR] [--mem MB] [--timeout S]
#
# Builds the release binary and the release test executables here, copies
# them into the guest at the same absolute paths (they have the binary's
# path and CARGO_TARGET_TMPDIR compiled in), with units/, policies/ and
# scripts/, and runs tests/guest/inside.sh there: test users, install as the
# README says (scripts/install.sh --start), corral doctor / policy check /
# status, then every integration test executable twice: brokers as child
# processes (rlimit mode) and brokers as units of the guest's systemd
# (CORRAL_TEST_UNDER_SYSTEMD=1). Exits non-zero when any of them failed.
# The guest's console is kept in target/guest/console.log.
#
# CORRAL_GUEST_REQUIRE overrides the features the guest must have (default:
# root,landlock,seccomp,users,python3,bwrap,toolchain,node,systemd — not
# landlock-tcp or landlock-scopes: Landlock ABI 2 has neither; not npm).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd -P)
guest_args=() mem=3072 limit=2700
while [ $# -gt 0 ]; do
  case "$1" in
    --cache) guest_args+=(--cache "$2"); shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    *) echo "usage: $0 [--cache DIR] [--mem MB] [--timeout S]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (the guest is built and booted as root)" >&2; exit 1; }

# The shipped binary is built small (Cargo.toml: fat LTO, one codegen unit,
# opt-level "s"), which costs a whole-program link of a minute or more per
# executable. The suites build about a dozen test executables: they keep the
# build they had before (no LTO, 16 codegen units, opt-level 3), and so does
# the corral binary they run. Same code; set these to test the shipped build.
export CARGO_PROFILE_RELEASE_LTO="${CARGO_PROFILE_RELEASE_LTO:-false}"
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS="${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-16}"
export CARGO_PROFILE_RELEASE_OPT_LEVEL="${CARGO_PROFILE_RELEASE_OPT_LEVEL:-3}"

t0=$(date +%s)
# The release test executables (the same build `cargo test --release` uses),
# and the binary they run. Integration tests only: kind "test".
mkdir -p target/guest
cargo test --release --locked --no-run --message-format=json >target/guest/build.json
mapfile -t tests < <(python3 - target/guest/build.json <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + "=" + m["executable"])
PY
)
[ ${#tests[@]} -gt 0 ] || { echo "cargo built no test executables" >&2; exit 1; }
# CORRAL_GUEST_SUITES=egress,family: only these suites (a quicker check while
# working on them; CI runs them all).
if [ -n "${CORRAL_GUEST_SUITES:-}" ]; then
  keep=()
  for t in "${tests[@]}"; do
    case ",$CORRAL_GUEST_SUITES," in *",${t%%=*},"*) keep+=("$t") ;; esac
  done
  tests=("${keep[@]}")
fi
binary=$repo/target/release/corral
[ -x "$binary" ] || { echo "no $binary after the build" >&2; exit 1; }
echo "built in $(($(date +%s) - t0)) s: corral and ${#tests[@]} test executables (${tests[*]%%=*})"

# Files keep their absolute paths in the guest (the test executables have
# them compiled in). A checkout under /tmp or /var/tmp would be hidden by the
# guest's own /tmp: it goes to /srv/corral-guest/... and inside.sh binds it
# back onto the original path first.
prefix=""
case "$repo" in /tmp/*|/var/tmp/*) prefix=/srv/corral-guest ;; esac
copies=(--copy "$binary" "$prefix$binary")
for t in "${tests[@]}"; do copies+=(--copy "${t#*=}" "$prefix${t#*=}"); done
for d in units policies scripts tests/guest; do copies+=(--copy "$repo/$d" "$prefix$repo/$d"); done

t1=$(date +%s)
set +e
tests/guest/debian-guest.sh "${guest_args[@]}" --mem "$mem" --timeout "$limit" "${copies[@]}" \
  -- env CORRAL_GUEST_REQUIRE="${CORRAL_GUEST_REQUIRE:-}" CORRAL_GUEST_BIND_FROM="${prefix:+$prefix$repo}" \
  "$prefix$repo/tests/guest/inside.sh" "$repo" "${tests[@]}" \
  | tee target/guest/console.log
code=${PIPESTATUS[0]}
set -e
echo "guest run: $(($(date +%s) - t1)) s (whole: $(($(date +%s) - t0)) s); console in target/guest/console.log"
# The guest prints one SUMMARY line per test executable and mode.
grep -a -o 'SUMMARY.*' target/guest/console.log | tr -d '\r' || true
[ "$code" = 0 ] || echo "the suites FAILED in the guest (exit $code)" >&2
exit "$code"
