//! The load of a row: a burst of a shape's whole workload, or inserts paced by the clock.

use std::time::{Duration, Instant};

use mongodb::bson::Document;
use mongodb::Collection;
use ordo_e2e::sample::{Generator, Workload};

use crate::latency::{insert_timed, InsertTimes};
use crate::seed::to_seed_vocabulary;
use crate::{split, Args, Shape};

/// What a row writes.
pub(crate) struct Load {
    pub(crate) workload: Workload,
    /// Events/s for the steady shape; None for a burst.
    pub(crate) rate: Option<f64>,
    pub(crate) secs: u64,
    /// Filler bytes in every event's payload.
    pub(crate) padding: usize,
}

pub(crate) fn load_for(args: &Args, shape: Shape, rate: Option<f64>) -> Load {
    match shape {
        Shape::Hot => Load {
            workload: split(args.hot_aggregates, args.hot_events_per_aggregate, 1),
            rate: None,
            secs: 0,
            padding: 0,
        },
        Shape::Churn => Load {
            workload: split(args.churn_aggregates, args.churn_events_per_aggregate, 2),
            rate: None,
            secs: 0,
            padding: 0,
        },
        Shape::Large => Load {
            workload: split(args.large_aggregates, args.large_events_per_aggregate, 4),
            rate: None,
            secs: 0,
            padding: args.large_payload_bytes,
        },
        Shape::Steady => {
            let r = rate.unwrap_or(1.0).max(1.0);
            let per = ((r * args.steady_secs as f64) / args.steady_aggregates.max(1) as f64).ceil()
                as usize
                + 1;
            Load {
                workload: split(args.steady_aggregates, per, 3),
                rate: Some(r),
                secs: args.steady_secs,
                padding: 0,
            }
        }
    }
}

/// Writes the load into `coll`: a burst in batches of 500, or paced by the clock at `rate`
/// for `secs` (at most `limit` events). Returns the events written and when the last was.
pub(crate) async fn write_load(
    coll: &Collection<Document>,
    load: &Load,
    limit: usize,
    translate: bool,
    times: &InsertTimes,
) -> anyhow::Result<(usize, Instant)> {
    let mut g = Generator::new(load.workload, "").with_padding(load.padding);
    let total = load.workload.total_events().min(limit);
    let mut written = 0;
    let started = Instant::now();
    match load.rate {
        None => {
            while written < total {
                let mut batch = g.next_batch(500.min(total - written));
                if batch.is_empty() {
                    break;
                }
                if translate {
                    batch.iter_mut().for_each(to_seed_vocabulary);
                }
                written += insert_timed(coll, batch, times).await?;
            }
        }
        Some(rate) => {
            let end = Duration::from_secs(load.secs);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while started.elapsed() < end && written < total {
                tick.tick().await;
                let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(total);
                if due > written {
                    let mut batch = g.next_batch(due - written);
                    if batch.is_empty() {
                        break;
                    }
                    if translate {
                        batch.iter_mut().for_each(to_seed_vocabulary);
                    }
                    written += insert_timed(coll, batch, times).await?;
                }
            }
        }
    }
    Ok((written, Instant::now()))
}
