#!/usr/bin/env bash
# Build the broker's container image (what `./dev.sh image` runs).
#
#   scripts/build_image.sh [--new-base] [EXTRA BUILD ARGS...]
#
# Engine: docker when its daemon answers, else podman (podman, buildah and runc are installed from
# Debian's packages when missing). Base image, the first that is there:
#   1. $BROKER_IMAGE_BASE, when set;
#   2. python:3.11-slim, already local or pulled (docker: always this one, pulled as usual);
#   3. podman only: localhost/resource-broker-base:bookworm, a Debian bookworm made here with
#      `debootstrap --variant=minbase` (with python3, python3-venv, ca-certificates and the current
#      security updates) and `podman import`ed. It is kept, so the next build starts from it; after
#      --new-base a fresh one is made (to take newer Debian updates).
# The image is tagged $BROKER_IMAGE (default resource-broker:<version in pyproject.toml>).
# Where a container runtime cannot set the default resource limits (seen on this project's
# machines: runc's "error setting rlimit type 7: operation not permitted", as the process may not
# raise its own limits), the build passes the caller's own limits; where even that fails, it builds
# with --isolation chroot.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

SLIM=docker.io/library/python:3.11-slim
DEBIAN_BASE=localhost/resource-broker-base:bookworm
MIRROR=${BROKER_IMAGE_MIRROR:-http://deb.debian.org/debian}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${BROKER_IMAGE:-resource-broker:$VERSION}

new_base=0
if [ "${1:-}" = "--new-base" ]; then new_base=1; shift; fi

# One build at a time on a machine: the engine's storage and the made base are the machine's, and a
# second build started meanwhile (.ci/run's in the background, then tests/test_image.py's) waits
# here, then finds the layers cached.
LOCK=${BROKER_IMAGE_LOCK:-/var/tmp/resource-broker-image.lock}
exec 9>>"$LOCK"
if ! flock -n 9; then
  log "another image build holds $LOCK: waiting for it"
  flock 9
fi

apt_install() {
  log "installing $* from Debian's packages"
  scripts/apt_install.sh "$@"
}

# The CA bundle pip inside the build trusts, passed as a build secret (never stored in a layer): the
# host's, which holds whatever CA an intercepting proxy on this network needs; empty when there is none.
ca_bundle() {
  local f
  for f in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    if [ -n "$f" ] && [ -s "$f" ]; then echo "$f"; return; fi
  done
  echo /dev/null
}

labels() {
  local revision
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  printf -- '--label\norg.opencontainers.image.title=resource-broker\n'
  printf -- '--label\norg.opencontainers.image.version=%s\n' "$VERSION"
  printf -- '--label\norg.opencontainers.image.revision=%s\n' "$revision"
  printf -- '--label\norg.opencontainers.image.base.name=%s\n' "$1"
}

# --- docker -------------------------------------------------------------------------------------
if [ "${BROKER_IMAGE_ENGINE:-}" != podman ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  base=${BROKER_IMAGE_BASE:-$SLIM}
  log "docker build $IMAGE on $base"
  mapfile -t label_args < <(labels "$base")
  DOCKER_BUILDKIT=1 exec docker build --build-arg "BASE=$base" --secret "id=ca-certificates,src=$(ca_bundle)" \
    "${label_args[@]}" -t "$IMAGE" "$@" .
fi

# --- podman -------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v buildah >/dev/null || missing+=(buildah)
# runc explicitly: it satisfies podman's runtime dependency, where crun refuses cgroup v1 hybrid hosts.
command -v runc >/dev/null || command -v crun >/dev/null || missing+=(runc)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

make_debian_base() {
  command -v debootstrap >/dev/null || apt_install debootstrap
  local work
  work=$(mktemp -d /var/tmp/broker-base.XXXXXX)
  # shellcheck disable=SC2064  # expand now: the path is fixed
  trap "umount '$work/rootfs/proc' 2>/dev/null || true; rm -rf --one-file-system '$work'" EXIT
  log "making $DEBIAN_BASE with debootstrap from $MIRROR (a few minutes)"
  local started=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
  # Point releases and security updates, as Debian's own images have them.
  cat >"$work/rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
  mount -t proc proc "$work/rootfs/proc"
  chroot "$work/rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >/dev/null && apt-get clean'
  umount "$work/rootfs/proc"
  rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/*.bin "$work"/rootfs/var/log/*.log \
    "$work"/rootfs/var/log/apt/* "$work"/rootfs/tmp/*
  : >"$work/rootfs/etc/resolv.conf"   # the engine provides these at run time
  : >"$work/rootfs/etc/hostname"
  tar --numeric-owner -C "$work/rootfs" -c . \
    | podman import --change 'CMD ["/bin/bash"]' --message "debootstrap --variant=minbase bookworm" - "$DEBIAN_BASE" >/dev/null
  rm -rf --one-file-system "$work"
  trap - EXIT
  log "made $DEBIAN_BASE in $((SECONDS - started)) s"
}

if [ -n "${BROKER_IMAGE_BASE:-}" ]; then
  base=$BROKER_IMAGE_BASE
elif podman image exists "$SLIM"; then
  base=$SLIM
elif [ $new_base = 0 ] && podman image exists "$DEBIAN_BASE"; then
  base=$DEBIAN_BASE
elif [ $new_base = 0 ] && pull_err=$(timeout 120 podman pull -q "$SLIM" 2>&1 >/dev/null); then
  base=$SLIM
else
  [ $new_base = 1 ] || log "no $SLIM here and pulling it failed (${pull_err##*$'\n'}): making a base"
  make_debian_base
  base=$DEBIAN_BASE
fi

# Can this machine's runtime start a container from the base with the default limits, or with ours?
isolation=()
probe_err=$(podman run --rm --network none "$base" true 2>&1) || {
  nproc_max=$(ulimit -Hu)
  pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "$nproc_max")
  if [ "$nproc_max" = unlimited ] || [ "$nproc_max" -gt "$pid_max" ]; then nproc_max=$pid_max; fi
  limits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$nproc_max:$nproc_max")
  if podman run --rm --network none "${limits[@]}" "$base" true 2>/dev/null; then
    log "the runtime cannot set the default limits here ($probe_err): building with ${limits[*]}"
    isolation=("${limits[@]}")
  else
    log "no container starts here ($probe_err): building with --isolation chroot"
    isolation=(--isolation chroot)
  fi
}

log "podman build $IMAGE on $base"
mapfile -t label_args < <(labels "$base")
started=$SECONDS
podman build --format docker --layers --build-arg "BASE=$base" --secret "id=ca-certificates,src=$(ca_bundle)" \
  "${isolation[@]}" "${label_args[@]}" -t "$IMAGE" "$@" .
log "built $IMAGE in $((SECONDS - started)) s"
