#!/bin/sh
# PID 1 of a private PID+mount+UTS+IPC namespace (started by ns.sh beside it):
# execs a real systemd that brings up only journald and dbus, for tests.
# The namespace still shares the root file system, /sys, the cgroup trees and
# the network with the machine, so the stock targets are NOT safe to boot:
# systemd-tmpfiles would wipe the machine's /tmp, udev rename its network
# card, systemd-sysctl rewrite its sysctls, enabled services start. Hence:
# private tmpfs on /run, /tmp and /var/tmp, and runtime masks (in the private
# /run) for every unit the stock targets would pull in.
set -e
mount --make-rprivate /
# A checkout under /tmp or /var/tmp (CI may clone there) must stay visible:
# hold it open, cover the directory with tmpfs, bind it back in place.
keep=${CORRAL_NS_KEEP:-}
case "$keep" in /tmp/*|/var/tmp/*) exec 9<"$keep" ;; *) keep= ;; esac
for d in /run /tmp /var/tmp; do mount -t tmpfs tmpfs "$d"; done
# --no-canonicalize: mount(8) would resolve the fd link to the path string,
# which by now names the new, empty directory.
if [ -n "$keep" ]; then mkdir -p "$keep" && mount --no-canonicalize --bind /proc/self/fd/9 "$keep"; exec 9<&-; fi
mount -t proc proc /proc
mkdir -p /run/systemd/system && cd /run/systemd/system
units_kept=" systemd-logind.service systemd-journald.service systemd-journald.socket systemd-journald-dev-log.socket systemd-journald-audit.socket dbus.service dbus.socket "
for u in /etc/systemd/system/*.wants/* /lib/systemd/system/*.wants/* \
         timers.target paths.target getty.target console-getty.service \
         systemd-udevd.service systemd-udev-trigger.service systemd-tmpfiles-setup.service \
         systemd-tmpfiles-setup-dev.service systemd-sysctl.service systemd-journal-flush.service \
         systemd-remount-fs.service; do
  n=${u##*/}
  case "$units_kept" in *" $n "*) ;; *) ln -sf /dev/null "$n" ;; esac
done
printf '[Unit]\nDescription=test: journald + dbus only\nRequires=basic.target dbus.service\nAfter=basic.target dbus.service\n' >test.target
export container=unshare
exec /lib/systemd/systemd --system --unit=test.target --log-target=console
