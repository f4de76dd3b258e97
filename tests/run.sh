#!/usr/bin/env bash
# Install everything needed for testing, then run the whole test suite.
#
#   bash tests/run.sh [pytest args]
#
# The tests start their own throwaway PostgreSQL server (tests/pgserver.py) from the PostgreSQL server binaries,
# which this script installs from Debian's packages when they are missing; ALIGND_TEST_POSTGRES_URL names an
# existing server instead. The web tests drive Debian's chromium with Playwright (never a browser Playwright
# downloads); it is installed the same way when missing, and ALIGND_TEST_CHROMIUM names another executable.
# The real vLLM engine runs on the demo model, built once into .alignd-test-cache/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash deploy/install.sh --dev

packages=()
if [ -z "${ALIGND_TEST_POSTGRES_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
   && ! command -v initdb >/dev/null 2>&1; then
  packages+=(postgresql)
fi
if [ -z "${ALIGND_TEST_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  packages+=(chromium)
fi
if [ "${#packages[@]}" -gt 0 ]; then
  echo "installing from Debian: ${packages[*]}" >&2
  sudo_=(); [ "$(id -u)" = 0 ] || sudo_=(sudo)
  "${sudo_[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${packages[@]}" >/dev/null
fi

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
