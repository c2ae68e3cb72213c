#!/usr/bin/env bash
# Idempotent: make Debian's Chromium available for the browser tests (tests/test_browser.py).
# Playwright drives /usr/bin/chromium directly (executable_path), so no browser build is ever
# downloaded (never `playwright install`). Installs the `chromium` package with apt-get only when
# it is missing, apt-get exists and we are root; otherwise it says why and leaves things alone
# (the browser tests then skip with that reason). Never fails the caller.
set -uo pipefail
cd "$(dirname "$0")/.."
CHROMIUM=${NOLA_CHROMIUM:-/usr/bin/chromium}
LOG=${NOLA_BROWSER_LOG:-test-artifacts/install_browser.log}

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_browser] $CHROMIUM missing and no apt-get: browser tests will be skipped" >&2
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "[install_browser] $CHROMIUM missing and not root: browser tests will be skipped" \
       "(install it with: sudo apt-get install -y chromium)" >&2
  exit 0
fi

mkdir -p "$(dirname "$LOG")"
t0=$(date +%s)
echo "[install_browser] installing Debian's chromium with apt-get (~3 minutes; log: $LOG)"
{
  echo "+ apt-get update ($(date -u +%FT%TZ))"
  # recommends are kept (fonts-liberation etc.): without fonts the App's text renders as boxes
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q &&
    echo "+ apt-get install -y chromium" &&
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q chromium
} >>"$LOG" 2>&1
rc=$?
if [ $rc -ne 0 ] || [ ! -x "$CHROMIUM" ]; then
  echo "[install_browser] apt-get exited $rc and $CHROMIUM is still missing; last lines of $LOG:" >&2
  tail -20 "$LOG" >&2
  echo "[install_browser] browser tests will be skipped" >&2
  exit 0
fi
echo "[install_browser] chromium installed in $(( $(date +%s) - t0 ))s: $("$CHROMIUM" --version 2>/dev/null)"
