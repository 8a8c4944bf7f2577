#!/bin/bash
# Writes build/code-order.ld: the functions a worker runs, then those an
# idle broker and its front door run, gathered in front of the rest of the
# binary's code (README, Footprint). As root:
#
#   scripts/code-order/order.sh
#
# Builds the shipped binary with its symbols (target/code-order/, or
# CARGO_TARGET_DIR), starts a broker with one workflow under
# scripts/code-order/fcov.c, which records every function the broker and
# its worker enter from their start through a few calls (a trivial one,
# output, stderr and an exit code, stdin, a timeout, a file written in the
# workspace, a status), and writes each as a section pattern
# without the parts that change from one build or toolchain to the next
# (symbol hashes, crate disambiguators, LLVM's numeric suffixes). Run it
# again when a worker's code paths change much; a function it misses still
# links, only outside the worker's pages.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run as root: the broker starts its worker as another user" >&2; exit 1; }
out=build/code-order.ld
target=${CARGO_TARGET_DIR:-$PWD/target/code-order}
env -u CARGO_PROFILE_RELEASE_LTO -u CARGO_PROFILE_RELEASE_CODEGEN_UNITS -u CARGO_PROFILE_RELEASE_OPT_LEVEL \
  CARGO_PROFILE_RELEASE_STRIP=false CARGO_TARGET_DIR="$target" cargo build --release --locked --bin corral
bin=$target/release/corral
dir=$(mktemp -d /run/corral-code-order.XXXXXX)
trap 'kill "$tracer" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
cc -O2 -Wall -o "$dir/fcov" scripts/code-order/fcov.c
nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ { print $1, $3 }' >"$dir/symbols"
mkdir "$dir/policies"
cat >"$dir/policies/order.toml" <<'EOT'
[workflow]
name = "order"
tenant = "order"

[sandbox]
read = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"]
write = ["{workspace}"]

[pool]
min_idle = 1
max_workers = 1
EOT
RUST_LOG=warn "$dir/fcov" "$dir/symbols" "$dir/worker" "$dir/broker" -- "$bin" broker --systemd off --instance code-order \
  --policies "$dir/policies" --socket "$dir/s.sock" --state-dir "$dir/state" >"$dir/log" 2>&1 &
tracer=$!
call() {
  curl -sf --unix-socket "$dir/s.sock" -H 'x-corral-workflow: order' \
    -d "{\"workflow\":\"order\",$1}" http://corral/v1/exec >/dev/null
}
for _ in $(seq 100); do
  curl -s --unix-socket "$dir/s.sock" http://corral/v1/status 2>/dev/null | grep -q '"state":"idle"' && break
  sleep 0.1
done
call '"argv":["true"]'
call '"argv":["echo","hello"]'
call '"argv":["sh","-c","echo oops >&2; exit 3"]'
call '"argv":["cat"],"stdin":"hello"'
call '"argv":["sleep","5"],"timeout_ms":200'
call '"argv":["sh","-c","echo x > written && mkdir -p d && echo y > d/f"]'
call '"argv":["true"]'
curl -sf --unix-socket "$dir/s.sock" http://corral/v1/status >/dev/null
sleep 1
kill "$tracer"
wait "$tracer" 2>/dev/null || true
[ -s "$dir/worker" ] && [ -s "$dir/broker" ] || { echo "no worker function was recorded; the broker said:" >&2; cat "$dir/log" >&2; exit 1; }

python3 - "$dir/worker" "$dir/broker" "$out" "$(rustc -V)" <<'PY'
import re, sys
worker, broker, out, rustc = sys.argv[1:]
# The C runtime's own (crt1.o, crti.o) are not in sections of their own.
CRT = {"_start", "_init", "_fini", "frame_dummy", "register_tm_clones", "deregister_tm_clones"}

def pattern(name):
    p = re.sub(r"17h[0-9a-f]{16}E$", "17h*", name)      # legacy mangling: the hash
    p = re.sub(r"\.(llvm\.)?[0-9]+$", "*", p)            # LLVM's local suffixes
    if name.startswith("_R"):                            # v0 mangling (std)
        p = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", p) + ("" if p.endswith("*") else "*")
    return p

seen, sections = set(), []
for path in (worker, broker):
    ps = []
    for name in (l.strip() for l in open(path)):
        p = pattern(name)
        if name not in CRT and p not in seen:
            seen.add(p)
            ps.append(p)
    sections.append(ps)
with open(out, "w") as f:
    f.write("/* The functions a corral worker runs, then those an idle broker and its\n"
            " * front door run, each in the order first run, gathered in front of the\n"
            " * binary's other code: each process then maps a few hundred KiB of code\n"
            " * rather than most of it (README, Footprint). build.rs passes this to the\n"
            " * linker. Written by scripts/code-order/order.sh with\n"
            f" * {rustc}. */\n")
    f.write("SECTIONS\n{\n")
    for name, ps in zip(("worker", "broker"), sections):
        f.write(f"  .text.{name} : {{\n")
        for p in ps:
            f.write(f"    *(.text.{p})\n")
        f.write("  }\n")
    f.write("}\nINSERT BEFORE .text;\n")
print(f"{out}: {len(sections[0])} worker and {len(sections[1])} broker patterns")
PY
