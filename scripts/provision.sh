#!/usr/bin/env bash
# Installs what the tests and the demo need that cargo does not: SecantusDB (the MongoDB
# stand-in, a Python package) into the project-local virtual environment .venv.
# Idempotent and quick when everything is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secantus_version="0.7.0b3"
venv="$root/.venv"
if [ -x "$venv/bin/secantusd-py" ] && "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('SecantusDB') == '$secantus_version'" 2>/dev/null; then
  exit 0
fi
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "provision: python3 is required for the MongoDB stand-in (SecantusDB)" >&2; exit 1; }
echo "provision: installing SecantusDB==$secantus_version into $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "SecantusDB==$secantus_version"
"$venv/bin/secantusd-py" --help >/dev/null
