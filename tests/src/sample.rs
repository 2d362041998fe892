//! Sample User and Order event streams, as a team migrating to ordo would have them.
//!
//! Streams are generated from a seed, so a failing run can be replayed. Every stream is valid:
//! it starts with the creation event, removes only items that were added, and is contiguous
//! from eventId 1. Events are inserted interleaved across aggregates, in order within each.

use mongodb::bson::{doc, DateTime, Document};
use mongodb::Collection;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Number of User aggregates.
    pub users: usize,
    /// Number of Order aggregates.
    pub orders: usize,
    /// Events per aggregate.
    pub events_per_aggregate: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl Workload {
    /// Total number of events.
    pub fn total_events(&self) -> usize {
        (self.users + self.orders) * self.events_per_aggregate
    }
}

/// One aggregate's stream state while generating.
#[derive(Debug)]
struct Stream {
    id: String,
    kind: Kind,
    next: i64,
    items: Vec<String>,
    cancelled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Order,
}

/// A generator of interleaved sample events.
#[derive(Debug)]
pub struct Generator {
    rng: StdRng,
    streams: Vec<Stream>,
    /// The streams with events left to generate, in no order: kept as they complete, so
    /// picking one costs the same whatever the number of aggregates (churn has 10,000; a list
    /// rebuilt per event took a core of a 2-core benchmark machine).
    open: Vec<usize>,
    per_aggregate: i64,
    /// Prefix of every aggregate id, so two runs in one database do not collide.
    prefix: String,
    /// Bytes of filler in every payload (`payload.padding`, which no projection reads): events
    /// as large as some teams' are.
    padding: usize,
}

impl Generator {
    /// A generator for `w`; aggregate ids start with `prefix`.
    pub fn new(w: Workload, prefix: &str) -> Self {
        let mut streams = Vec::with_capacity(w.users + w.orders);
        for i in 0..w.users {
            streams.push(Stream {
                id: format!("{prefix}user-{i:05}"),
                kind: Kind::User,
                next: 1,
                items: Vec::new(),
                cancelled: false,
            });
        }
        for i in 0..w.orders {
            streams.push(Stream {
                id: format!("{prefix}order-{i:05}"),
                kind: Kind::Order,
                next: 1,
                items: Vec::new(),
                cancelled: false,
            });
        }
        let open = if w.events_per_aggregate > 0 {
            (0..streams.len()).collect()
        } else {
            Vec::new()
        };
        Self {
            rng: StdRng::seed_from_u64(w.seed),
            streams,
            open,
            per_aggregate: w.events_per_aggregate as i64,
            prefix: prefix.to_string(),
            padding: 0,
        }
    }

    /// The same generator with `bytes` of filler in every payload.
    pub fn with_padding(mut self, bytes: usize) -> Self {
        self.padding = bytes;
        self
    }

    /// The aggregate id prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next `n` events (fewer when every stream is complete), interleaved at random.
    pub fn next_batch(&mut self, n: usize) -> Vec<Document> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && !self.open.is_empty() {
            let k = self.rng.random_range(0..self.open.len());
            let i = self.open[k];
            let ev = self.event_for(i);
            if self.streams[i].next > self.per_aggregate {
                self.open.swap_remove(k);
            }
            out.push(ev);
        }
        out
    }

    fn event_for(&mut self, i: usize) -> Document {
        let last = self.streams[i].next == self.per_aggregate;
        let roll: u32 = self.rng.random_range(0..100);
        let sku_n: u32 = self.rng.random_range(0..20);
        let qty: i32 = self.rng.random_range(1..5);
        let price: f64 = f64::from(self.rng.random_range(100..10_000)) / 100.0;
        let s = &mut self.streams[i];
        let v = s.next;
        s.next += 1;
        let (aggregate_type, event_type, mut payload) = match s.kind {
            Kind::User => {
                if v == 1 {
                    (
                        "User",
                        "UserRegistered",
                        doc! { "email": format!("{}@example.com", s.id), "name": format!("User {}", s.id) },
                    )
                } else if last && roll < 30 {
                    ("User", "UserDeactivated", doc! { "reason": "requested" })
                } else if roll < 60 {
                    (
                        "User",
                        "UserEmailUpdated",
                        doc! { "email": format!("{}+{v}@example.com", s.id) },
                    )
                } else {
                    (
                        "User",
                        "UserRenamed",
                        doc! { "name": format!("User {} v{v}", s.id) },
                    )
                }
            }
            Kind::Order => {
                if v == 1 {
                    (
                        "Order",
                        "OrderCreated",
                        doc! { "customerId": format!("{}user-{:05}", self.prefix, sku_n), "currency": "EUR" },
                    )
                } else if last && roll < 25 && !s.cancelled {
                    s.cancelled = true;
                    ("Order", "OrderCancelled", doc! { "reason": "customer" })
                } else if roll < 30 && !s.items.is_empty() {
                    let k = (sku_n as usize) % s.items.len();
                    let sku = s.items.remove(k);
                    ("Order", "ItemRemovedFromOrder", doc! { "sku": sku })
                } else {
                    let sku = format!("sku-{sku_n:03}-{v}");
                    s.items.push(sku.clone());
                    (
                        "Order",
                        "ItemAddedToOrder",
                        doc! { "sku": sku, "qty": qty, "price": price },
                    )
                }
            }
        };
        if self.padding > 0 {
            payload.insert("padding", "x".repeat(self.padding));
        }
        doc! {
            "aggregateId": s.id.clone(),
            "aggregateType": aggregate_type,
            "eventId": v,
            "eventType": event_type,
            "payload": payload,
            "timestamp": DateTime::now(),
        }
    }
}

/// Inserts `events` in order (one `insert_many`, ordered), stamping each with the current time.
pub async fn insert(
    events: &Collection<Document>,
    mut batch: Vec<Document>,
) -> mongodb::error::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let now = DateTime::now();
    for d in &mut batch {
        d.insert("timestamp", now);
    }
    events.insert_many(batch).ordered(true).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn streams_are_contiguous_valid_and_replayable() {
        let w = Workload {
            users: 7,
            orders: 9,
            events_per_aggregate: 12,
            seed: 42,
        };
        let mut g = Generator::new(w, "t-");
        let mut all = Vec::new();
        loop {
            let b = g.next_batch(50);
            if b.is_empty() {
                break;
            }
            all.extend(b);
        }
        assert_eq!(all.len(), w.total_events());
        let mut next: HashMap<String, i64> = HashMap::new();
        for e in &all {
            let id = e.get_str("aggregateId").unwrap().to_string();
            let v = e.get_i64("eventId").unwrap();
            let want = next.entry(id).or_insert(1);
            assert_eq!(v, *want, "contiguous per aggregate");
            *want += 1;
            if v == 1 {
                assert!(matches!(
                    e.get_str("eventType").unwrap(),
                    "UserRegistered" | "OrderCreated"
                ));
            }
        }
        let mut again = Generator::new(w, "t-");
        let first = again.next_batch(50);
        let strip = |d: &Document| {
            let mut d = d.clone();
            d.remove("timestamp");
            d
        };
        assert_eq!(
            first.iter().map(strip).collect::<Vec<_>>(),
            all[..50].iter().map(strip).collect::<Vec<_>>()
        );
    }

    /// Padding makes every event larger and changes nothing else: the same events, in the
    /// same order, each payload with `padding` of the asked size.
    #[test]
    fn padding_adds_bytes_and_changes_no_event() {
        let w = Workload {
            users: 3,
            orders: 3,
            events_per_aggregate: 5,
            seed: 7,
        };
        let plain = Generator::new(w, "p-").next_batch(100);
        let padded = Generator::new(w, "p-").with_padding(4096).next_batch(100);
        assert_eq!(plain.len(), w.total_events());
        assert_eq!(plain.len(), padded.len());
        for (a, b) in plain.iter().zip(&padded) {
            let mut b = b.clone();
            let filler = b.get_document_mut("payload").unwrap().remove("padding");
            assert_eq!(filler.and_then(|f| f.as_str().map(str::len)), Some(4096));
            for k in ["aggregateId", "eventId", "eventType", "payload"] {
                assert_eq!(a.get(k), b.get(k), "{k}");
            }
        }
    }
}
