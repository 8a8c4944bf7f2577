#!/bin/bash
# Installs corral as a systemd service: the binary, units/ (corral.service,
# corral.socket, corral.slice, and corral-bridge-telegram.service, left
# disabled until its token is there), the sysusers.d and tmpfiles.d files and the
# example policies; then runs systemd-sysusers, systemd-tmpfiles --create and
# systemctl daemon-reload. Needs root.
#
#   scripts/install.sh [--binary PATH] [--runtime] [--start]
#
#   --binary PATH  the corral binary (default: target/release/corral)
#   --runtime      install below /run only (units in /run/systemd/system,
#                  sysusers.d and tmpfiles.d in /run, binary and config in
#                  /run/corral-install; the binary stays where it is when
#                  /run is noexec, as Debian mounts it): gone at the next
#                  boot. The tests use it (a namespaced systemd's /run is
#                  private).
#   --start        enable and start corral.socket and corral.service
set -euo pipefail
cd "$(dirname "$0")/.."
binary=target/release/corral runtime=0 start=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --runtime) runtime=1; shift ;;
    --start) start=1; shift ;;
    *) echo "usage: $0 [--binary PATH] [--runtime] [--start]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x "$binary" ] || { echo "no corral binary at $binary: run cargo build --release, or pass --binary" >&2; exit 1; }
[ -d /run/systemd/system ] || { echo "systemd is not running here: corral can still run as 'corral broker' (rlimits only)" >&2; exit 1; }

if [ $runtime = 1 ]; then
  bindir=/run/corral-install/bin etc=/run/corral-install/etc units=/run/systemd/system cfg=/run
else
  bindir=/usr/local/bin etc=/etc/corral units=/etc/systemd/system cfg=/etc
fi
exe=$bindir/corral
# Debian's initramfs mounts /run noexec: a binary copied there cannot start
# (203/EXEC, "Permission denied"). The runtime install then puts it in
# /var/lib/corral-install (not where it is: a checkout under /tmp would be
# hidden from the service by its PrivateTmp).
if [ $runtime = 1 ] && findmnt -no OPTIONS --target /run 2>/dev/null | grep -qw noexec; then
  bindir=/var/lib/corral-install/bin
  exe=$bindir/corral
fi
install -d -m 0755 "$units" "$cfg/sysusers.d" "$cfg/tmpfiles.d" "$etc" "$etc/policies"
install -d -m 0700 "$etc/credentials"
install -d -m 0755 "$bindir"
install -m 0755 "$binary" "$exe"
for u in corral.service corral.socket corral.slice corral-bridge-telegram.service; do
  # Not through a symlink (a unit masked to /dev/null, say): replace it.
  rm -f "$units/$u"
  sed -e "s|/usr/local/bin/corral|$exe|g" -e "s|/etc/corral/|$etc/|g" "units/$u" >"$units/$u"
  chmod 0644 "$units/$u"
done
install -m 0644 units/sysusers.d/corral.conf "$cfg/sysusers.d/corral.conf"
install -m 0644 units/tmpfiles.d/corral.conf "$cfg/tmpfiles.d/corral.conf"
# Example policies, unless the operator already has some.
if [ -z "$(ls -A "$etc/policies")" ]; then
  install -m 0644 policies/*.toml "$etc/policies/"
fi
# An empty key for the local Ollama of the examples (LoadCredential= needs the file).
[ -e "$etc/credentials/ollama" ] || install -m 0600 /dev/null "$etc/credentials/ollama"

systemd-sysusers "$cfg/sysusers.d/corral.conf"
systemd-tmpfiles --create "$cfg/tmpfiles.d/corral.conf"
systemctl daemon-reload
# A socket that an older install made 0660 root:corral-users stays so
# until corral.socket restarts: open it now, as the unit says (the broker
# authorizes each request; see the README, "Who can reach the socket").
[ -S /run/corral/corral.sock ] && chmod 0666 /run/corral/corral.sock
if [ $start = 1 ]; then
  # --runtime enables below /run too: a plain enable would link the socket
  # into /etc/systemd/system, which outlives the boot (and, in the tests'
  # namespaced systemd, is the machine's own /etc).
  enable=(enable --now); [ $runtime = 1 ] && enable=(enable --runtime --now)
  systemctl "${enable[@]}" corral.socket >/dev/null 2>&1 || systemctl start corral.socket
  systemctl start corral.service
fi
echo "installed: $exe, units in $units, policies in $etc/policies"
# The Telegram bridge stays disabled: it needs the bot's token (and members
# linked to Telegram ids, see the README's "Telegram bridge").
if [ -e "$etc/telegram-token" ]; then
  echo "Telegram bridge: token found; start it with: systemctl enable --now corral-bridge-telegram.service"
else
  echo "Telegram bridge (optional): put BotFather's token into $etc/telegram-token (0600 root), then"
  echo "  systemctl enable --now corral-bridge-telegram.service"
fi
echo "check the host with: $exe doctor --policies $etc/policies"
echo "check a client with: $exe doctor --as USER (every user in a policy's clients can reach the socket)"
