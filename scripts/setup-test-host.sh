#!/bin/sh
# Prepares a Debian/Ubuntu host (as root) for corral's demo and test suite:
# the packages the tests call, the workers' service users, and the client
# users the multi-tenant tests log in as. Safe to run again.
#
#   scripts/setup-test-host.sh [--no-build]
#
#   --no-build  this host only runs prebuilt binaries and tests (the qemu
#               guest of tests/guest/): no npm (its toolchain tests are not
#               required there), no openai venv (nor its test)
#
# apt-get runs only when something is missing; without a reachable mirror it
# stops and names what to install.
set -eu
build=1
case "${1:-}" in
  --no-build) build=0 ;;
  "") ;;
  *) echo "usage: $0 [--no-build]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and creates users)" >&2; exit 1; }

# command:package; curl only for the demo's hints. The toolchain the
# sandboxed tools of tests/toolchain.rs run (git, make, cc, c++, node; npm
# where a build happens: the Debian 12 guest carries no npm) must be in
# /usr/bin, where the policies' PATH looks.
tools="python3:python3 bwrap:bubblewrap curl:curl ip:iproute2 runuser:util-linux nsenter:util-linux useradd:passwd"
tools="$tools /usr/bin/git:git /usr/bin/make:make /usr/bin/cc:gcc /usr/bin/c++:g++ /usr/bin/node:nodejs"
[ $build = 0 ] || tools="$tools /usr/bin/npm:npm"
need=""
add() { case " $need " in *" $1 "*) ;; *) need="$need $1" ;; esac; }
for p in $tools; do
  command -v "${p%%:*}" >/dev/null 2>&1 || add "${p#*:}"
done
# python3 -m venv with pip (ensurepip)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || add python3-venv
if [ -n "$need" ]; then
  echo "installing:$need" >&2
  command -v apt-get >/dev/null 2>&1 || { echo "missing:$need, and this host has no apt-get: install them by hand" >&2; exit 1; }
  if ! apt-get update -qq; then
    echo "missing:$need, and apt-get cannot reach its mirrors (no network?): install them by hand, or from local packages" >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null \
    || { echo "apt-get could not install:$need (no network? see above)" >&2; exit 1; }
fi

# The official OpenAI Python client, for tests/stream.rs (a real client
# that lists models and streams a chat through the broker's socket): in a
# venv of its own, from PyPI. Set CORRAL_TEST_OPENAI_VENV to put it elsewhere.
venv="${CORRAL_TEST_OPENAI_VENV:-/opt/corral-test/openai}"
if [ $build = 1 ] && ! "$venv/bin/python3" -c 'import openai' >/dev/null 2>&1; then
  echo "installing the openai Python package into $venv" >&2
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check openai \
    || { echo "pip could not install openai into $venv (no network? PyPI must be reachable)" >&2; exit 1; }
fi

# Service users the workers run as (no login, no home): the default one,
# one per tenant of the example policies, and one for the limit tests;
# corral-bot, the Telegram bridge's user (tests/bridge.rs).
for u in corral-worker corral-alice corral-kid corral-dev corral-test corral-bot; do
  id "$u" >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$u"
done
getent group corral-users >/dev/null || groupadd --system corral-users
# People who call the broker: alice and kid are clients of the example
# policies; mallory is nobody's client.
for u in alice kid mallory; do
  id "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$u"
done
echo "test host ready: users corral-worker corral-alice corral-kid corral-dev corral-test corral-bot alice kid mallory"
