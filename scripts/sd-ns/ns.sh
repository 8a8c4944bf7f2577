#!/bin/sh
# Boot / locate / stop a real systemd as PID 1 of a private namespace, for
# the tests (the machine's own PID 1 need not be systemd).
#   ns.sh start  -> boots it, waits for the bus, prints its PID (as seen here)
#   ns.sh pid    -> prints that PID (empty if none)
#   ns.sh stop   -> powers it off, waits, removes the empty cgroups it left
# Run commands inside with: nsenter -t "$(ns.sh pid)" -m -p CMD
here=$(cd "$(dirname "$0")" && pwd)
pidfile=/run/corral-sd-ns.pid
log=/run/corral-sd-ns.log
sdpid() {
  [ -s "$pidfile" ] || return 0
  u=$(cat "$pidfile")
  [ -d "/proc/$u" ] && pgrep -P "$u" -x systemd | head -1
}
case "$1" in
start)
  [ -n "$(sdpid)" ] && { sdpid; exit 0; }
  # CORRAL_NS_KEEP: a directory under /tmp or /var/tmp to keep visible inside.
  setsid unshare --pid --fork --mount --uts --ipc env CORRAL_NS_KEEP="${CORRAL_NS_KEEP:-}" "$here/pid1.sh" \
    >"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 1 150); do
    p=$(sdpid)
    if [ -n "$p" ]; then
      st=$(timeout 30 nsenter -t "$p" -m -p systemctl is-system-running --wait 2>/dev/null)
      case "$st" in running|degraded) echo "$p"; exit 0 ;; esac
    fi
    sleep 0.2
  done
  echo "systemd did not come up; see $log" >&2; exit 1 ;;
pid) sdpid ;;
stop)
  p=$(sdpid); [ -z "$p" ] && exit 0
  nsenter -t "$p" -m -p systemctl poweroff 2>/dev/null
  for _ in $(seq 1 150); do [ -d "/proc/$p" ] || break; sleep 0.2; done
  if [ -d "/proc/$p" ]; then kill -9 "$p" 2>/dev/null; sleep 0.5; fi
  # It leaves empty cgroups in the shared v1 hierarchies; remove them, but only
  # when the machine's own PID 1 is not systemd (whose cgroups these would be).
  if [ "$(cat /proc/1/comm)" != systemd ]; then
    for d in /sys/fs/cgroup/*/init.scope /sys/fs/cgroup/*/system.slice /sys/fs/cgroup/*/user.slice \
             /sys/fs/cgroup/*/corral.slice /sys/fs/cgroup/*/*.mount; do
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
  fi
  rm -f "$pidfile"
  echo stopped ;;
*) echo "usage: $0 start|pid|stop" >&2; exit 2 ;;
esac
