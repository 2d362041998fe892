//! The latency of every event, insert → read model: insert times recorded as the load is
//! written, and a change stream on ordo's read-model collections that sees each model's
//! version move.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{Bson, DateTime, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::Collection;
use ordo_e2e::sample::insert;
use ordo_e2e::stack::Stack;
use ordo_e2e::stats::percentile;
use ordo_projection::Projection;
use serde_json::{json, Value};

/// Insert time (Unix ms) of every event, by aggregate, in eventId order.
pub(crate) type InsertTimes = Arc<Mutex<HashMap<String, Vec<i64>>>>;

/// Inserts `batch`, recording each event's insert time.
pub(crate) async fn insert_timed(
    coll: &Collection<Document>,
    batch: Vec<Document>,
    times: &InsertTimes,
) -> anyhow::Result<usize> {
    let n = batch.len();
    let now = DateTime::now().timestamp_millis();
    {
        let mut t = times.lock().unwrap_or_else(|e| e.into_inner());
        for d in &batch {
            let id = d.get_str("aggregateId").unwrap_or_default().to_string();
            t.entry(id).or_default().push(now);
        }
    }
    insert(coll, batch).await?;
    Ok(n)
}

fn bson_i64(v: Option<&Bson>) -> Option<i64> {
    match v? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// Watches ordo's read-model collections: every write carries the model's new `lastEventId`
/// and the projector's `lastUpdatedAt`, so each event between the previous and the new version
/// reached the read model at that time. Collects those latencies (seconds) until stopped.
pub(crate) struct ReadModelWatch {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    latencies: Arc<Mutex<Vec<f64>>>,
}

impl ReadModelWatch {
    pub(crate) async fn start(stack: &Stack, times: InsertTimes) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let versions: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
        let mut tasks = Vec::new();
        for p in stack.projections()? {
            let coll = stack.db().collection::<Document>(p.collection());
            let mut stream = coll
                .watch()
                .max_await_time(Duration::from_millis(100))
                .await?;
            let (stop, latencies, versions, times) = (
                stop.clone(),
                latencies.clone(),
                versions.clone(),
                times.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let change: ChangeStreamEvent<Document> =
                        match tokio::time::timeout(Duration::from_millis(250), stream.next()).await
                        {
                            Err(_) => continue,
                            Ok(None) => return Ok(()),
                            Ok(Some(c)) => c?,
                        };
                    record(change, &versions, &times, &latencies);
                }
                Ok(())
            }));
        }
        Ok(Self {
            stop,
            tasks,
            latencies,
        })
    }

    pub(crate) async fn finish(self) -> anyhow::Result<Vec<f64>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        Ok(l.clone())
    }
}

/// The latencies of the events a read-model write applied: those between the version the model
/// had and the one it now has.
fn record(
    change: ChangeStreamEvent<Document>,
    versions: &Mutex<HashMap<String, i64>>,
    times: &InsertTimes,
    latencies: &Mutex<Vec<f64>>,
) {
    let fields = match change.operation_type {
        OperationType::Update => change.update_description.map(|u| u.updated_fields),
        OperationType::Insert | OperationType::Replace => change.full_document,
        _ => None,
    };
    let (Some(fields), Some(key)) = (fields, change.document_key) else {
        return;
    };
    let (Some(v), Ok(at)) = (
        bson_i64(fields.get("lastEventId")),
        fields.get_datetime("lastUpdatedAt"),
    ) else {
        return;
    };
    let id = key.get_str("_id").unwrap_or_default().to_string();
    let prev = {
        let mut vs = versions.lock().unwrap_or_else(|e| e.into_inner());
        let e = vs.entry(id.clone()).or_insert(0);
        let prev = *e;
        *e = (*e).max(v);
        prev
    };
    if v <= prev {
        return;
    }
    let t = times.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(inserted) = t.get(&id) {
        let mut l = latencies.lock().unwrap_or_else(|e| e.into_inner());
        for k in prev..v.min(inserted.len() as i64) {
            l.push((at.timestamp_millis() - inserted[k as usize]).max(0) as f64 / 1000.0);
        }
    }
}

/// Percentiles of `lat`; `censored` events have no sample of their own.
pub(crate) fn latency_json(lat: &mut [f64], censored: usize) -> Value {
    json!({
        "samples": lat.len(),
        "p50": percentile(lat, 0.5),
        "p95": percentile(lat, 0.95),
        "p99": percentile(lat, 0.99),
        "max": percentile(lat, 1.0),
        "censored": censored,
    })
}
