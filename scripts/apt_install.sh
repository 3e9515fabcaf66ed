#!/usr/bin/env bash
# Install Debian packages: apt-get update, then install "$@" quietly.
#
# One lock for every caller of this project: ./.ci/run builds the image (which installs its build
# tools on the host) while ./dev.sh test installs the test's packages, and two apt-gets at once
# fail at once on apt's own locks ("Could not get lock /var/lib/apt/lists/lock"). Other programs'
# apt runs (unattended upgrades) are waited for through apt's lock timeout.
set -euo pipefail
command -v apt-get >/dev/null || { echo "apt_install: $* missing and no apt-get to install it" >&2; exit 1; }
exec 8>>"${BROKER_APT_LOCK:-/var/tmp/resource-broker-apt.lock}"
flock -w 1800 8 || { echo "apt_install: another install held the lock for 30 minutes" >&2; exit 1; }
for attempt in 1 2 3; do
  if apt-get -o DPkg::Lock::Timeout=600 update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null; then
    exit 0
  fi
  echo "apt_install: attempt $attempt to install $* failed; retrying" >&2
  sleep $((attempt * 10))
done
exit 1
