//! The benchmark's arguments and its workload shapes.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// A workload shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Shape {
    /// Few aggregates with many events each, written as a burst.
    Hot,
    /// Many aggregates with few events each (new orders, changed e-mails), as a burst.
    Churn,
    /// Inserts paced by the clock at a fraction of the hot shape's measured capacity.
    Steady,
    /// Large events (`--large-payload-bytes` each) as a burst: the bytes in flight, not the
    /// number of events, bound the producer. Not in the default run.
    Large,
}

impl Shape {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Shape::Hot => "hot",
            Shape::Churn => "churn",
            Shape::Steady => "steady",
            Shape::Large => "large",
        }
    }
}

/// Every workload shape through ordo and through the seed design, side by side.
#[derive(Debug, Parser)]
#[command(name = "ordo-bench")]
pub(crate) struct Args {
    /// Shapes to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["hot", "churn", "steady"])]
    pub(crate) shapes: Vec<Shape>,
    /// Broker round trips (milliseconds, emulator `[namespace] round_trip`) to run every shape
    /// with, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["0", "3"])]
    pub(crate) round_trip_ms: Vec<u64>,
    /// Aggregates of the hot shape (half User, half Order).
    #[arg(long, default_value_t = 500)]
    pub(crate) hot_aggregates: usize,
    /// Events per aggregate of the hot shape.
    #[arg(long, default_value_t = 40)]
    pub(crate) hot_events_per_aggregate: usize,
    /// Aggregates of the churn shape.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) churn_aggregates: usize,
    /// Events per aggregate of the churn shape.
    #[arg(long, default_value_t = 2)]
    pub(crate) churn_events_per_aggregate: usize,
    /// How long the steady shape inserts (30 s by default, to keep the whole run near 5
    /// minutes on 2 cores with the Rust SecantusDB; the latency percentiles settle within it).
    #[arg(long, default_value_t = 30)]
    pub(crate) steady_secs: u64,
    /// Offered load of the steady shape as a fraction of the hot shape's events/s measured with
    /// the same round trip.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) steady_fraction: f64,
    /// Offered load of the steady shape in events/s, when the hot shape is not run.
    #[arg(long)]
    pub(crate) steady_rate: Option<f64>,
    /// Aggregates the steady shape's events are spread over.
    #[arg(long, default_value_t = 500)]
    pub(crate) steady_aggregates: usize,
    /// Aggregates of the large-event shape.
    #[arg(long, default_value_t = 200)]
    pub(crate) large_aggregates: usize,
    /// Events per aggregate of the large-event shape.
    #[arg(long, default_value_t = 10)]
    pub(crate) large_events_per_aggregate: usize,
    /// Filler bytes in each payload of the large-event shape (a 32 KiB event by default; the
    /// Standard tier takes messages up to 256 KiB).
    #[arg(long, default_value_t = 32 * 1024)]
    pub(crate) large_payload_bytes: usize,
    /// The producer's `max_in_flight_bytes` (its default when not given).
    #[arg(long)]
    pub(crate) max_in_flight_bytes: Option<usize>,
    /// The producer's `read_batch_size` (its default when not given).
    #[arg(long)]
    pub(crate) read_batch_size: Option<u32>,
    /// Projector processes (and seed consumers).
    #[arg(long, default_value_t = 2)]
    pub(crate) projectors: usize,
    /// A row that has not caught up this many seconds after its last write stops and reports
    /// the rate it reached (marked `complete: false`), so a slow shape cannot stall the run.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_row_secs: u64,
    /// Skip the seed design.
    #[arg(long)]
    pub(crate) no_seed: bool,
    /// Events of each shape the seed design is measured on: the same shape with proportionally
    /// fewer aggregates (the steady shape: its first events at the same pace). At about 9
    /// events/s the seed cannot do the whole workload in a bounded run.
    #[arg(long, default_value_t = 400)]
    pub(crate) seed_events: usize,
    /// How long the seed design gets per row; events not applied by then count with the time
    /// they had waited (their latency is at least that).
    #[arg(long, default_value_t = 25)]
    pub(crate) seed_secs: u64,
    /// The seed design's directory (`npm ci` there first).
    #[arg(long, default_value = "bench/seed-baseline")]
    pub(crate) seed_dir: PathBuf,
    /// Events of the stand-ins' ceiling measurements.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) ceiling_events: usize,
    /// Concurrent senders for the raw send ceiling (the producer's `senders` default).
    #[arg(long, default_value_t = 64)]
    pub(crate) senders: usize,
    /// The Rust SecantusDB server; default `.ordo/tools/bin/secantusd-rs` when present,
    /// otherwise the Python server (slower; said in the output).
    #[arg(long, env = "ORDO_BENCH_SECANTUS_BIN")]
    pub(crate) secantus_bin: Option<PathBuf>,
    /// The SecantusDB process started for the run (for its CPU use), when it was.
    #[arg(skip)]
    pub(crate) secantus_pid: Option<u32>,
    /// Where the JSON summary and the SVG chart go.
    #[arg(long, default_value = "target/ordo-bench")]
    pub(crate) out: PathBuf,
}
