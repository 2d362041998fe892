//! ordo-core: the daemons' common ground: what both use, and the stores and clients one of them
//! uses that tests and `status` reach too (the producer's checkpoint and
//! lease, the projector's heartbeat). The projection engine is its own crate,
//! `ordo-projection`, so custom projections depend on it alone.
//!
//! Module map:
//! - [`envelope`]: the message contract between producer and projector (body, ids, properties).
//! - [`cli`]: what both binaries do before `run` with the flags each parses: load the config
//!   (or check it with `--check-config`; exit 2 naming the key on an error), build the runtime.
//! - [`config`]: TOML + `ORDO__SECTION__KEY` loading, the sections both daemons share, validation.
//! - [`secret`]: connection strings that never reach a log line.
//! - [`checkpoint`]: the producer's resume-token store (`ordo_checkpoints`), fenced by a lease.
//! - [`lease`]: leader election for one active producer per stream (`ordo_leases`).
//! - [`indexes`]: the unique (aggregateId, eventId) index on the events collection.
//! - [`servicebus`]: the only module that knows azservicebus; ordo's own traits over it.
//! - [`mongo`]: connecting to MongoDB with ordo's defaults, its readiness probe, and the error
//!   classes retries are labelled with.
//! - [`telemetry`]: logs, the Prometheus recorder, `/healthz` `/readyz` `/metrics`.
//! - [`metrics`]: every metric name, in one place.
//! - [`status`]: what `ordo-projector status` shows an operator, the projector heartbeat it
//!   reads, and the host name both daemons identify themselves with.
//! - [`readiness`]: what `/readyz` answers: each dependency's fault, held while it lasts.
//! - [`shutdown`]: the root cancellation token, task tracker and signal handling, the drain
//!   bounded by the grace period (`Shutdown::drain`), and `last_step`, a bounded step at exit.
//! - [`retry`]: the capped, jittered backoff and the step most retry loops take after a
//!   failure (the module names those that step their own way).
//! - [`restart`]: the rule supervised tasks of both daemons are restarted by (backoff started
//!   over after a healthy run, `ordo_task_restarts_total{task}`, the panic's message).

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod envelope;
pub mod indexes;
pub mod lease;
pub mod metrics;
pub mod mongo;
pub mod readiness;
pub mod restart;
pub mod retry;
pub mod secret;
pub mod servicebus;
pub mod shutdown;
pub mod status;
pub mod telemetry;
