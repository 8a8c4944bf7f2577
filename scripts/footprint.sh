#!/bin/sh
# Memory footprint of an idle broker and its workers with 1, 10 and 100
# workflows (one warm worker each, --systemd off): PSS and private memory
# from /proc/PID/smaps_rollup, and the binary's size. As root:
#   scripts/footprint.sh [path/to/corral]   (default target/release/corral)
set -eu
bin=$(readlink -f "${1:-target/release/corral}")
dir=$(mktemp -d /run/corral-footprint.XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$2/smaps_rollup"; }
echo "binary: $(stat -c %s "$bin") bytes ($bin)"
echo
echo "| workflows | broker PSS KiB | broker private KiB | broker RSS KiB | worker PSS KiB (mean) | worker private KiB (mean) | all PSS KiB |"
echo "|---|---|---|---|---|---|---|"
for n in 1 10 100; do
  rm -rf "$dir/policies"; mkdir -p "$dir/policies"
  i=0
  while [ "$i" -lt "$n" ]; do
    cat >"$dir/policies/w$i.toml" <<EOT
[workflow]
name = "w$i"
tenant = "footprint"

[sandbox]
read = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"]

[pool]
min_idle = 1
max_workers = 1
EOT
    i=$((i + 1))
  done
  RUST_LOG=warn "$bin" broker --systemd off --instance footprint --policies "$dir/policies" \
    --socket "$dir/s.sock" --state-dir "$dir/state" >/dev/null 2>&1 &
  pid=$!
  tries=0
  until [ "$(curl -s --unix-socket "$dir/s.sock" http://x/v1/status | grep -o '"state":"idle"' | wc -l)" -ge "$n" ]; do
    tries=$((tries + 1)); [ "$tries" -lt 600 ] || { echo "pools did not start" >&2; exit 1; }
    sleep 0.1
  done
  sleep 2 # let start-up garbage settle: this is the idle figure
  workers=$(pgrep -P "$pid" || true)
  wp=0; wpriv=0; nw=0
  for w in $workers; do
    wp=$((wp + $(kib Pss "$w"))); nw=$((nw + 1))
    wpriv=$((wpriv + $(kib Private_Clean "$w") + $(kib Private_Dirty "$w")))
  done
  bp=$(kib Pss "$pid"); bpriv=$(($(kib Private_Clean "$pid") + $(kib Private_Dirty "$pid"))); brss=$(kib Rss "$pid")
  echo "| $n | $bp | $bpriv | $brss | $((wp / nw)) | $((wpriv / nw)) | $((bp + wp)) |"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
