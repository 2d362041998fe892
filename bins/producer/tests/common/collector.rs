//! The collector: reads the topic's `projector` subscription with azservicebus, session by
//! session, and keeps what each aggregate received in arrival order.

use super::*;

/// Messages received from the subscription, per aggregate, in arrival order, and the raw count.
#[derive(Debug, Default)]
pub struct Received {
    pub per_aggregate: HashMap<String, Vec<i64>>,
    pub message_ids: HashSet<String>,
    pub raw: usize,
}

impl Received {
    /// Distinct messages (what MessageId dedup leaves).
    pub fn distinct(&self) -> usize {
        self.message_ids.len()
    }

    /// Checks that, after dedup, every aggregate's sequence is exactly 1..=n.
    pub fn check(&self, expected: &HashMap<String, i64>) -> Result<(), String> {
        for (a, n) in expected {
            let got = self.per_aggregate.get(a).cloned().unwrap_or_default();
            let want: Vec<i64> = (1..=*n).collect();
            if got != want {
                let first_bad = got
                    .iter()
                    .zip(&want)
                    .position(|(g, w)| g != w)
                    .unwrap_or(got.len().min(want.len()));
                return Err(format!(
                    "aggregate {a}: got {} events, want {n}; first difference at index {first_bad}: {:?}",
                    got.len(),
                    &got[first_bad.saturating_sub(2)..(first_bad + 3).min(got.len())]
                ));
            }
        }
        if self.per_aggregate.len() != expected.len() {
            return Err(format!(
                "unexpected aggregates: got {}, want {}",
                self.per_aggregate.len(),
                expected.len()
            ));
        }
        Ok(())
    }
}

/// Reads the subscription (peek-lock, completing what it recorded), session after session.
pub struct Collector {
    pub received: Arc<Mutex<Received>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Collector {
    pub fn start(bus: &TestServiceBus) -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = CancellationToken::new();
        let cs = Secret::new(bus.connection_string());
        let topic = bus.topic().to_string();
        let sub = bus.subscription().to_string();
        // Several receivers, as several projector workers would: sessions are drained in
        // parallel and each session is still read by one receiver at a time.
        let tasks = (0..4)
            .map(|_| {
                tokio::spawn(collect(
                    received.clone(),
                    cs.clone(),
                    (topic.clone(), sub.clone()),
                    stop.clone(),
                ))
            })
            .collect();
        Self {
            received,
            stop,
            tasks,
        }
    }

    pub fn distinct(&self) -> usize {
        self.received.lock().unwrap().distinct()
    }

    pub async fn stop(self) -> Received {
        self.stop.cancel();
        // A receiver's complete or dispose can wait forever on a link the broker already
        // dropped (fe2o3-amqp 0.14); what was received is in `received` either way.
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// Waits until the collector saw `n` distinct messages.
#[track_caller]
pub fn wait_distinct(
    c: &Collector,
    n: usize,
    timeout: Duration,
) -> impl std::future::Future<Output = ()> {
    let received = c.received.clone();
    ordo_testkit::wait_until(timeout, move || {
        let got = received.lock().unwrap().distinct();
        async move { got >= n }
    })
}

/// One receiver of the collector: accepts the subscription's sessions one after another and
/// drains each, on a fresh connection after any fault, until `stop`.
async fn collect(
    received: Arc<Mutex<Received>>,
    cs: Secret,
    (topic, sub): (String, String),
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let Ok(Ok(mut client)) = tokio::time::timeout(
            Duration::from_secs(5),
            ordo_core::servicebus::test_client(&cs, "test-collector"),
        )
        .await
        else {
            // The broker is down (an outage test): try again shortly.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                _ = stop.cancelled() => return,
            }
        };
        loop {
            let options = ServiceBusSessionReceiverOptions {
                prefetch_count: 0,
                receive_mode: ServiceBusReceiveMode::PeekLock,
                identifier: None,
                ..Default::default()
            };
            let accepted = tokio::select! {
                r = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.accept_next_session_for_subscription(&topic, &sub, options),
                ) => r,
                _ = stop.cancelled() => return,
            };
            let mut receiver = match accepted {
                Ok(Ok(r)) => r,
                // A cancelled accept can leave the client's AMQP session
                // unusable: start over on a fresh connection.
                Ok(Err(_)) | Err(_) => break,
            };
            drain(&mut receiver, &received).await;
            let _ = receiver.dispose().await;
        }
    }
}

/// Receives and completes a session's messages until it has none for 150 ms (or a receive
/// fails), recording each.
async fn drain(receiver: &mut ServiceBusSessionReceiver, received: &Mutex<Received>) {
    loop {
        let got = match receiver
            .receive_messages_with_max_wait_time(500, Some(Duration::from_millis(150)))
            .await
        {
            Ok(g) => g,
            Err(_) => break,
        };
        if got.is_empty() {
            break;
        }
        {
            let mut r = received.lock().unwrap();
            for m in &got {
                r.raw += 1;
                let id = m.message_id().map(|s| s.to_string()).unwrap_or_default();
                let env = Envelope::decode(m.body().unwrap()).expect("envelope");
                if r.message_ids.insert(id) {
                    r.per_aggregate
                        .entry(env.aggregate_id)
                        .or_default()
                        .push(env.event_id);
                }
            }
        }
        for m in &got {
            let _ = receiver.complete_message(m).await;
        }
    }
}
