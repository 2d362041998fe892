#!/usr/bin/env bash
# The test command: provisions the stand-ins, builds the daemons, runs every test.
# Set ORDO_TEST_MONGODB_URI / ORDO_TEST_SERVICEBUS_CONNECTION_STRING to run the same tests
# against a real replica set and a real Service Bus namespace.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/provision.sh
# The end-to-end tests spawn the daemon binaries: nextest (and cargo test) build every target of
# the workspace, the binaries too, before the first test starts. One build, not a separate
# `cargo build --bins` first: that one resolves features without the dev-dependencies, so the
# test build compiled the workspace and several dependencies a second time.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
