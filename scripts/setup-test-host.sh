#!/bin/sh
# Prepares a Debian/Ubuntu host (as root) for corral's demo and test suite:
# the packages the tests call, the workers' service users, and the client
# users the multi-tenant tests log in as. Safe to run again.
set -eu
[ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and creates users)" >&2; exit 1; }

need=""
for p in python3:python3 bwrap:bubblewrap curl:curl runuser:util-linux gcc:gcc; do
  command -v "${p%%:*}" >/dev/null 2>&1 || need="$need ${p#*:}"
done
if [ -n "$need" ]; then
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

# Service users the workers run as (no login, no home): the default one,
# one per tenant of the example policies, and one for the limit tests.
for u in corral-worker corral-alice corral-kid corral-test; do
  id "$u" >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$u"
done
getent group corral-users >/dev/null || groupadd --system corral-users
# People who call the broker: alice and kid are clients of the example
# policies; mallory is nobody's client.
for u in alice kid mallory; do
  id "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$u"
done
echo "test host ready: users corral-worker corral-alice corral-kid corral-test alice kid mallory"
