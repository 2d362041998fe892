#!/usr/bin/env bash
# The main job, end to end: SecantusDB and the Service Bus emulator (or the services named by
# MONGODB_URI and AZURE_SERVICEBUS_CONNECTION_STRING), one producer, two projectors, sample
# User and Order events, a projector killed and restarted half-way, and the verdict.
# Arguments go to ordo-demo (try --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/provision.sh
cargo build --release --locked -p ordo-producer -p ordo-projector -p ordo-e2e --bins
exec target/release/ordo-demo "$@"
