#!/bin/bash
# Boots a stock Debian 12 guest (systemd as PID 1, cgroup v2 with every
# controller, Debian's kernel 6.1 = Landlock ABI 2) under qemu, runs one
# command in it as root, and returns that command's exit status. The guest's
# console streams to stdout. corral's suite runs in it (tests/guest/run.sh).
#
#   tests/guest/debian-guest.sh [--cache DIR] [--copy SRC DEST]... [--mem MB]
#                               [--timeout S] -- COMMAND [ARG]...
#
#   --cache DIR     where the root file system is built once and kept
#                   (default /var/cache/corral-guest); delete it to rebuild
#   --copy SRC DEST copy a file or folder from here into the guest before boot
#                   (DEST is an absolute path in the guest)
#   --mem MB        guest memory (default 2048)
#   --timeout S     give up after S seconds (default 900)
#
# Needs root and the Debian packages qemu-system-x86, debootstrap, e2fsprogs
# (installed on first use). KVM is not used: nested KVM hangs on the project's
# machines, and TCG boots this guest in about 20 s. The guest has no network:
# everything it needs is in the root file system, built with debootstrap from
# the mirror apt uses here (about 90 s, once).
set -euo pipefail

cache=/var/cache/corral-guest mem=2048 limit=900 copies=()
usage() { echo "usage: $0 [--cache DIR] [--copy SRC DEST]... [--mem MB] [--timeout S] -- COMMAND [ARG]..." >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cache) cache=$2; shift 2 ;;
    --copy) copies+=("$2" "$3"); shift 3 ;;
    --mem) mem=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ $# -gt 0 ] || { echo "no command given" >&2; usage; }
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap and the guest's files need it)" >&2; exit 1; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# What the guest carries, beyond a minimal Debian: systemd as PID 1 and
# D-Bus (corral's scopes), the kernel, and what corral's tests call:
# bwrap, runuser/nsenter (util-linux), python3, ps/pgrep (procps), ip
# (iproute2), useradd (passwd), curl; ca-certificates as on any installed
# Debian (the LLM gateway's HTTP client wants a CA store); the toolchain
# tests/toolchain.rs runs in the sandbox: git, make, gcc, g++ (libc6-dev is
# only a recommendation of gcc), python3-venv, nodejs (npm is left out: it
# pulls in hundreds of packages). Changing the list rebuilds the root.
packages=systemd,systemd-sysv,dbus,linux-image-amd64,udev,kmod,passwd,util-linux,e2fsprogs,procps,python3,bubblewrap,iproute2,curl,ca-certificates,git,make,gcc,g++,libc6-dev,python3-venv,nodejs
root=$cache/rootfs
if [ ! -f "$cache/.built" ] || [ "$(cat "$cache/.built")" != "$packages" ]; then
  # the same mirror apt uses on this machine
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  echo "building the guest's root file system in $root (once; about 90 s)" >&2
  rm -rf "$root" "$cache/.built" && mkdir -p "$cache"
  start=$(date +%s)
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  echo guest >"$root/etc/hostname"
  echo "/dev/vda / ext4 defaults 0 1" >"$root/etc/fstab"
  # no network in the guest: nothing should wait for it
  systemctl --root="$root" mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
  rm -rf "$root"/var/cache/apt/archives/*.deb
  echo "$packages" >"$cache/.built"
  echo "root file system built in $(($(date +%s) - start)) s" >&2
fi

t0=$(date +%s)
work=$(mktemp -d /var/tmp/corral-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT
# a throw-away copy of the root, so every run starts from the same guest
cp -a "$root" "$work/root"
r=$work/root
for ((i = 0; i < ${#copies[@]}; i += 2)); do
  mkdir -p "$r/$(dirname "${copies[i+1]}")"
  cp -a "${copies[i]}" "$r/${copies[i+1]}"
done
{
  echo '#!/bin/bash'
  printf 'cd /root\n'
  printf '%q ' "$@"; echo
  echo 'echo "GUEST-EXIT=$?"'
} >"$r/usr/local/sbin/guest-run"
chmod +x "$r/usr/local/sbin/guest-run"
cat >"$r/etc/systemd/system/guest-run.service" <<'UNIT'
[Unit]
Description=run the requested command, then power off
After=multi-user.target dbus.service
[Service]
Type=oneshot
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/usr/local/sbin/guest-run
ExecStopPost=/bin/systemctl poweroff --no-block
UNIT
mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/guest-run.service "$r/etc/systemd/system/multi-user.target.wants/"
mkfs.ext4 -q -F -d "$r" -L root "$work/disk.img" 4G
rm -rf "$r"
echo "guest: disk prepared in $(($(date +%s) - t0)) s" >&2
t0=$(date +%s)

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
# loglevel=2: the kernel's OOM reports (the limit tests cause some) stay off
# the console, which carries the command's output.
timeout "$limit" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m "$mem" -nographic -no-reboot \
  -kernel "$kernel" -initrd "$initrd" \
  -append "root=/dev/vda rw console=ttyS0 quiet loglevel=2 systemd.show_status=0" \
  -drive file="$work/disk.img",format=raw,if=virtio -net none | tee "$work/console.log" || true
echo "guest: qemu ran for $(($(date +%s) - t0)) s" >&2
code=$(grep -a -o 'GUEST-EXIT=[0-9]*' "$work/console.log" | tail -1 | cut -d= -f2)
[ -n "$code" ] || { echo "the guest gave no exit status (boot failed or timed out after ${limit} s)" >&2; exit 1; }
exit "$code"
