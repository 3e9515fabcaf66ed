#!/usr/bin/env bash
# One entry point for people and CI. Each command bootstraps what it needs first:
#   ./dev.sh run     set up, then run the broker on the embedded sandbox cluster (insecure, data in ./.broker)
#   ./dev.sh test    set up, then run every check CI runs: generated code, buf, ruff, mypy, layering, pytest
#   ./dev.sh gen     regenerate the Python stubs from proto/, the README's settings table and the PrometheusRule
#   ./dev.sh lint    the static checks only
#   ./dev.sh bench   run the benchmarks (prints figures; not part of test)
#   ./dev.sh chaos [NAME...]  run the fault scenarios at full size (minutes), one PASS/FAIL line each
#   ./dev.sh image [--new-base]  build the container image resource-broker:<version> (docker or podman)
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_system() {
  # Python >= 3.11 with venv and pip; Debian packages are installed when they are missing.
  if ! command -v python3 >/dev/null || ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "installing python3 (>= 3.11 required)"
    scripts/apt_install.sh python3 python3-venv python3-pip
  fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    log "installing python3-venv"
    scripts/apt_install.sh python3-venv
  fi
  if ! command -v git >/dev/null; then
    scripts/apt_install.sh git
  fi
  # promtool checks and unit-tests the alert rules in deploy/monitoring (only the tool is used).
  if ! command -v promtool >/dev/null; then
    log "installing promtool (Debian's prometheus package)"
    scripts/apt_install.sh --no-install-recommends prometheus
  fi
}

ensure_postgres() {
  # The PostgreSQL store's tests start a throwaway server of their own on loopback
  # (tests/throwaway_postgres.py); they need Debian's server package, nothing running.
  if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then return; fi
  if [ "$(id -u)" -ne 0 ]; then
    log "postgresql is not installed and we are not root: install it (apt-get install postgresql)"
    return
  fi
  log "installing postgresql (the tests start a throwaway server on loopback)"
  scripts/apt_install.sh postgresql
}

ensure_browser() {
  # The web view's tests drive Debian's chromium through Playwright, which is never allowed to
  # download a browser of its own (no `playwright install`).
  if ! [ -x /usr/bin/chromium ]; then
    log "installing chromium (the web view's tests run in headless Chromium)"
    scripts/apt_install.sh chromium
  fi
}

ensure_venv() {
  ensure_system
  [ -x "$PY" ] || { log "creating virtual environment $VENV"; python3 -m venv "$VENV"; }
  # Reinstall only when the dependency declarations changed since the last install.
  local stamp="$VENV/.installed" want
  want=$(cat pyproject.toml clients/python/pyproject.toml sandbox/pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing Python packages into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
    # The sandbox is a distribution of its own (kube-sandbox): the broker runs without it.
    "$PY" -m pip install -q --disable-pip-version-check -e ./clients/python -e './sandbox[pytest]' -e '.[dev]'
    echo "$want" > "$stamp"
  fi
}

lint() {
  log "generated stubs are fresh"
  "$PY" scripts/gen_proto.py --check
  "$PY" scripts/gen_settings.py --check
  "$PY" scripts/gen_monitoring.py --check
  log "buf lint / format"
  "$VENV/bin/buf" lint
  "$VENV/bin/buf" format --diff --exit-code
  local against="${BUF_BREAKING_AGAINST:-HEAD~1}"
  if git rev-parse -q --verify "$against^{commit}" >/dev/null && git cat-file -e "$against:buf.yaml" 2>/dev/null; then
    log "buf breaking against $against"
    "$VENV/bin/buf" breaking --against ".git#ref=$against"
  else
    log "buf breaking: no earlier commit with buf.yaml to compare with ($against); skipped"
  fi
  log "ruff"
  "$VENV/bin/ruff" check .
  "$VENV/bin/ruff" format --check .
  log "mypy --strict"
  "$VENV/bin/mypy"
  log "import layering"
  "$VENV/bin/lint-imports"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  run)
    ensure_venv
    log "starting the broker on the sandbox cluster: gRPC :50051, HTTP :8082, data in ./.broker (Ctrl-C stops it)"
    exec "$VENV/bin/broker" serve --sandbox --insecure --data-dir .broker "$@"
    ;;
  test)
    ensure_venv
    ensure_postgres
    ensure_browser
    lint
    log "pytest"
    # pytest exits 5 when it collected nothing; set -e makes that a failure too.
    "$VENV/bin/pytest" "$@"
    ;;
  lint) ensure_venv; lint ;;
  gen) ensure_venv; "$PY" scripts/gen_proto.py; "$PY" scripts/gen_settings.py; "$PY" scripts/gen_monitoring.py ;;
  bench) ensure_venv; for b in benchmarks/bench_*.py sandbox/benchmarks/bench_*.py; do [ -f "$b" ] && "$PY" "$b"; done ;;
  chaos) ensure_venv; exec "$PY" -m chaos "$@" ;;
  image) exec scripts/build_image.sh "$@" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 64 ;;
esac
