//! The emulated namespace: topics and queues as ingress points, subscriptions and queues as
//! stores, address resolution, duplicate detection and fan-out.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use crate::{
    clock::now_ms,
    config::{EmulatorConfig, IngressConfig, StoreConfig},
    rules::{self, Admission, Refusal},
    stats::NamespaceStats,
    store::{AmqpMessage, Entity, EntitySettings, Part, Stored},
    wire,
};

/// Where a message sent to a topic or queue goes.
#[derive(Debug)]
pub(crate) struct Ingress {
    pub name: String,
    pub max_message_size: u64,
    admission: Admission,
    dedup_window_ms: Option<i64>,
    ttl_ms: i64,
    state: Mutex<IngressState>,
    /// Stores fed by this ingress, with each one's TTL cap.
    targets: Vec<(Arc<Entity>, i64)>,
}

#[derive(Debug)]
struct IngressState {
    next_seq: i64,
    seen: HashMap<String, i64>,
    seen_order: VecDeque<(i64, String)>,
}

/// What happened to the messages of one transfer.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Ingested {
    pub enqueued: usize,
    pub duplicates: usize,
}

impl Ingress {
    /// An ingress point with the settings topics and queues share, feeding `targets`, with no
    /// message seen yet; `requires_session` is [`Admission::requires_session`].
    fn new(
        config: IngressConfig<'_>,
        requires_session: bool,
        targets: Vec<(Arc<Entity>, i64)>,
    ) -> Self {
        let window = config.duplicate_detection_window;
        Self {
            name: config.name.to_owned(),
            max_message_size: config.max_message_size_bytes,
            admission: Admission {
                partitioned: config.partition_count > 1,
                duplicate_detection: window.is_some(),
                requires_session,
            },
            dedup_window_ms: window.map(|d| d.as_millis() as i64),
            ttl_ms: config.default_message_ttl.as_millis() as i64,
            state: Mutex::new(IngressState {
                next_seq: 1,
                seen: HashMap::new(),
                seen_order: VecDeque::new(),
            }),
            targets,
        }
    }

    /// Accepts the messages of one transfer atomically: either all are checked and enqueued (or
    /// dropped as duplicates), or the transfer is refused.
    pub(crate) fn ingest(&self, messages: Vec<AmqpMessage>) -> Result<Ingested, Refusal> {
        rules::admit(&messages, self.admission)?;
        let now = now_ms();
        let mut outcome = Ingested::default();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(window) = self.dedup_window_ms {
            while let Some((at, _)) = state.seen_order.front() {
                if *at + window > now {
                    break;
                }
                let (at, id) = state.seen_order.pop_front().expect("front");
                if state.seen.get(&id) == Some(&at) {
                    state.seen.remove(&id);
                }
            }
        }
        let mut accepted = Vec::with_capacity(messages.len());
        for message in messages {
            if self.dedup_window_ms.is_some() {
                if let Some(id) = wire::message_id_text(&message) {
                    if state.seen.contains_key(&id) {
                        outcome.duplicates += 1;
                        continue;
                    }
                    state.seen.insert(id.clone(), now);
                    state.seen_order.push_back((now, id));
                }
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let ttl = message
                .header
                .as_ref()
                .and_then(|h| h.ttl)
                .map(|t| t as i64)
                .unwrap_or(self.ttl_ms)
                .min(self.ttl_ms);
            let session: Arc<str> = message
                .properties
                .as_ref()
                .and_then(|p| p.group_id.as_deref())
                .unwrap_or("")
                .into();
            accepted.push((seq, Arc::new(message), ttl, session));
        }
        outcome.enqueued = accepted.len();
        // Fan-out happens under the ingress lock so every store sees sequence numbers in order.
        for (entity, ttl_cap) in &self.targets {
            entity.enqueue(accepted.iter().map(|(seq, message, ttl, session)| {
                Stored::new(
                    *seq,
                    message.clone(),
                    now,
                    now.saturating_add((*ttl).min(*ttl_cap)),
                    session.clone(),
                )
            }));
        }
        Ok(outcome)
    }
}

/// A resolved link address.
#[derive(Debug, Clone)]
pub(crate) enum Address {
    Cbs,
    /// `$management` of an entity; `None` for a topic's node (which exists but has no store).
    Management(Option<Arc<Entity>>, Part),
    /// A topic (or queue) address, meaningful for senders only.
    Ingress,
    Store(Arc<Entity>, Part),
    Unknown,
}

/// All entities, immutable after start; entity state lives inside each entity.
#[derive(Debug)]
pub(crate) struct Namespace {
    ingress: HashMap<String, Arc<Ingress>>,
    stores: HashMap<String, Arc<Entity>>,
}

/// A message store's settings as the store keeps them.
fn settings(config: StoreConfig) -> EntitySettings {
    EntitySettings {
        requires_session: config.requires_session,
        lock_ms: config.lock_duration.as_millis() as i64,
        max_delivery_count: config.max_delivery_count,
        dead_letter_on_expiry: config.dead_lettering_on_message_expiration,
    }
}

impl Namespace {
    pub(crate) fn new(config: &EmulatorConfig) -> Self {
        let mut ingress = HashMap::new();
        let mut stores = HashMap::new();
        for topic in &config.topics {
            let mut targets = Vec::new();
            for sub in &topic.subscriptions {
                let path = format!("{}/Subscriptions/{}", topic.name, sub.name);
                let entity = Arc::new(Entity::new(path.clone(), settings(sub.store())));
                let cap = sub
                    .default_message_ttl
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(i64::MAX);
                stores.insert(path.to_ascii_lowercase(), entity.clone());
                targets.push((entity, cap));
            }
            ingress.insert(
                topic.name.to_ascii_lowercase(),
                Arc::new(Ingress::new(topic.ingress(), false, targets)),
            );
        }
        for queue in &config.queues {
            let entity = Arc::new(Entity::new(queue.name.clone(), settings(queue.store())));
            stores.insert(queue.name.to_ascii_lowercase(), entity.clone());
            ingress.insert(
                queue.name.to_ascii_lowercase(),
                Arc::new(Ingress::new(
                    queue.ingress(),
                    queue.requires_session,
                    vec![(entity, i64::MAX)],
                )),
            );
        }
        Self { ingress, stores }
    }

    /// Resolves a link address: absolute (`amqp://host/path`, `sb://`, `amqps://`) or relative.
    pub(crate) fn resolve(&self, address: &str) -> Address {
        let path = strip_host(address).trim_matches('/');
        if path.eq_ignore_ascii_case("$cbs") {
            return Address::Cbs;
        }
        let lower = path.to_ascii_lowercase();
        if let Some(entity_path) = lower.strip_suffix("/$management") {
            return match self.store_path(entity_path) {
                Some((entity, part)) => Address::Management(Some(entity), part),
                None if self.ingress.contains_key(entity_path) => {
                    Address::Management(None, Part::Main)
                }
                None => Address::Unknown,
            };
        }
        if let Some((entity, part)) = self.store_path(&lower) {
            // A queue resolves to its store; senders go through `ingress_for` instead.
            return Address::Store(entity, part);
        }
        match self.ingress.get(&lower) {
            Some(_) => Address::Ingress,
            None => Address::Unknown,
        }
    }

    /// The ingress for a (queue or topic) address, for links that send to it.
    pub(crate) fn ingress_for(&self, address: &str) -> Option<Arc<Ingress>> {
        let path = strip_host(address).trim_matches('/').to_ascii_lowercase();
        self.ingress.get(&path).cloned()
    }

    fn store_path(&self, lower: &str) -> Option<(Arc<Entity>, Part)> {
        let (path, part) = match lower.strip_suffix("/$deadletterqueue") {
            Some(p) => (p, Part::DeadLetter),
            None => (lower, Part::Main),
        };
        self.stores.get(path).map(|e| (e.clone(), part))
    }

    /// The store at `topic/Subscriptions/sub` or `queue` (case-insensitive).
    pub(crate) fn entity(&self, path: &str) -> Option<Arc<Entity>> {
        self.stores.get(&path.to_ascii_lowercase()).cloned()
    }

    pub(crate) fn sweep(&self) {
        let now = now_ms();
        for entity in self.stores.values() {
            entity.sweep(now);
        }
    }

    pub(crate) fn stats(&self, connections: usize) -> NamespaceStats {
        let now = now_ms();
        let mut entities: Vec<_> = self.stores.values().map(|e| e.stats(now)).collect();
        entities.sort_by(|a, b| a.path.cmp(&b.path));
        NamespaceStats {
            entities,
            connections,
        }
    }
}

pub(crate) fn strip_host(address: &str) -> &str {
    for scheme in ["amqp://", "amqps://", "sb://"] {
        if address.len() >= scheme.len() && address[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &address[scheme.len()..];
            return match rest.find('/') {
                Some(i) => &rest[i..],
                None => "",
            };
        }
    }
    address
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_service_bus_addresses() {
        let ns = Namespace::new(&EmulatorConfig::default_ordo());
        assert!(matches!(
            ns.resolve("amqp://127.0.0.2/ordo-events"),
            Address::Ingress
        ));
        assert!(matches!(ns.resolve("$cbs"), Address::Cbs));
        assert!(matches!(
            ns.resolve("amqp://h/ordo-events/subscriptions/PROJECTOR"),
            Address::Store(_, Part::Main)
        ));
        assert!(matches!(
            ns.resolve("sb://h/ordo-events/Subscriptions/projector/$DeadLetterQueue"),
            Address::Store(_, Part::DeadLetter)
        ));
        assert!(matches!(
            ns.resolve("ordo-events/Subscriptions/projector/$management"),
            Address::Management(Some(_), Part::Main)
        ));
        assert!(matches!(
            ns.resolve("ordo-events/$management"),
            Address::Management(None, _)
        ));
        assert!(matches!(ns.resolve("amqp://h/nope"), Address::Unknown));
    }
}
