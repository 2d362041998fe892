#!/usr/bin/env bash
# Installs what the tests and the demo need that cargo does not:
# - SecantusDB (the MongoDB stand-in, a Python package) into the project-local virtual
#   environment .venv;
# - Microsoft's Service Bus SDKs the emulator is tested against
#   (crates/servicebus-emulator/tests/microsoft_sdks.rs): azure-servicebus into .venv, and
#   @azure/service-bus from crates/servicebus-emulator/tests/clients/package-lock.json with npm.
# Idempotent and quick when everything is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secantus_version="0.7.0b3"
# Keep in step with PYTHON_SDK_VERSION in crates/servicebus-emulator/tests/microsoft_sdks.rs.
servicebus_python_sdk_version="7.15.0"
venv="$root/.venv"
clients="$root/crates/servicebus-emulator/tests/clients"
# Copy of the lock file node_modules was installed from.
npm_stamp="$clients/node_modules/.ordo-installed-package-lock.json"

python_ready() {
  [ -x "$venv/bin/secantusd-py" ] && "$venv/bin/python" -c "
import importlib.metadata as m
assert m.version('SecantusDB') == '$secantus_version'
assert m.version('azure-servicebus') == '$servicebus_python_sdk_version'
" 2>/dev/null
}

if ! python_ready; then
  python="${PYTHON:-python3}"
  command -v "$python" >/dev/null || { echo "provision: python3 is required for the MongoDB stand-in (SecantusDB)" >&2; exit 1; }
  echo "provision: installing SecantusDB==$secantus_version and azure-servicebus==$servicebus_python_sdk_version into $venv" >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "SecantusDB==$secantus_version" "azure-servicebus==$servicebus_python_sdk_version"
  "$venv/bin/secantusd-py" --help >/dev/null
fi

if ! cmp -s "$clients/package-lock.json" "$npm_stamp"; then
  if command -v npm >/dev/null; then
    echo "provision: installing Microsoft's JavaScript Service Bus SDK into $clients/node_modules" >&2
    (cd "$clients" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$clients/package-lock.json" "$npm_stamp"
  else
    echo "provision: npm not found; the emulator's JavaScript SDK test will fail until Node.js 18+ with npm is installed and this script runs again" >&2
  fi
fi
