//! Chaos under load: the whole pipeline as real processes, with the producer and projectors
//! killed (SIGKILL) at random, the broker stopped and restarted, and MongoDB fail points
//! injected, while events keep arriving. Every fault is proven to have fired before the next
//! one (a killed pid's exit signal, the broker's connection count falling to zero, the retries
//! counter of the daemon a fail point was scoped to); a fault that cannot be injected (the
//! broker outage against an external namespace) is reported as not injected. Afterwards every
//! aggregate's read model must equal the fold of its events in the events collection, no
//! aggregate may be blocked, and the dead-letter queue must be empty (the workload has no
//! poison).
//!
//! Seeded: `ORDO_CHAOS_SEED=N` replays a run (the seed is printed first). The default length
//! fits CI; `ORDO_CHAOS_SECS=600` makes it a soak.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use ordo_core::metrics as m;
use ordo_e2e::sample::{insert, Generator, Workload};
use ordo_e2e::stack::{caught_up_and_folded_for, Stack};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillProducer,
    KillProjector(usize),
    BrokerOutage(Duration),
    FailUpdates,
    FailGetMore,
}

fn pick(rng: &mut StdRng, projectors: usize) -> Fault {
    match rng.random_range(0..5) {
        0 => Fault::KillProducer,
        1 => Fault::KillProjector(rng.random_range(0..projectors)),
        2 => Fault::BrokerOutage(Duration::from_millis(rng.random_range(1000..4000))),
        3 => Fault::FailUpdates,
        _ => Fault::FailGetMore,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_models_survive_chaos_under_load() {
    let seed = env_u64("ORDO_CHAOS_SEED").unwrap_or_else(rand::random);
    let secs = env_u64("ORDO_CHAOS_SECS").unwrap_or(40);
    println!("chaos: seed {seed}, {secs}s of faults (replay with ORDO_CHAOS_SEED={seed})");

    let mut stack = a_producer_and_two_projectors().await;
    let mut chaos = Chaos::new(seed);
    let written = chaos
        .write_under_faults(&mut stack, Duration::from_secs(secs))
        .await;
    stack.mongo.disable_fail_point("failCommand").await.unwrap();
    println!("load stopped: {written} events");
    chaos.report();

    every_read_model_is_its_fold_and_nothing_is_blocked_or_dead_lettered(&mut stack, seed).await;
}

/// The deployment under test: one producer and two projectors, with a short lease and
/// checkpoint interval so a killed producer's successor takes over within seconds.
async fn a_producer_and_two_projectors() -> Stack {
    let mut stack = Stack::start(Duration::from_secs(5)).await.unwrap();
    stack.producer_settings.lease_ttl = Duration::from_secs(3);
    stack.producer_settings.checkpoint_interval = Duration::from_millis(200);
    stack.projector_settings.max_concurrent_sessions = 16;
    stack.spawn_producer().await.unwrap();
    for slot in 0..2 {
        stack.spawn_projector(slot).await.unwrap();
    }
    stack
}

/// After the load: every read model equals its fold, no aggregate is blocked, and nothing is
/// dead-lettered (the workload has no poison).
async fn every_read_model_is_its_fold_and_nothing_is_blocked_or_dead_lettered(
    stack: &mut Stack,
    seed: u64,
) {
    caught_up_and_folded_for(stack, Duration::from_secs(180), &format!("seed {seed}")).await;
    assert_eq!(
        stack.blocked().await.unwrap(),
        0,
        "seed {seed}: no aggregate may be blocked"
    );
    if let Ok(emulator) = stack.bus.emulator() {
        let dlq = emulator
            .subscription_dead_letters(stack.bus.topic(), stack.bus.subscription())
            .unwrap();
        assert!(
            dlq.is_empty(),
            "seed {seed}: nothing is poison, yet dead-lettered: {:?}",
            dlq.first()
        );
    }
}

/// A seeded run of faults and what became of each.
struct Chaos {
    seed: u64,
    rng: StdRng,
    /// Faults injected, each with the proof that it fired.
    injected: Vec<(Fault, String)>,
    /// Faults that could not be injected here, with why.
    not_injected: Vec<(Fault, &'static str)>,
    /// A fail point fires on some later command: its proof is awaited while the load goes on.
    pending: Option<Pending>,
}

impl Chaos {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            injected: Vec::new(),
            not_injected: Vec::new(),
            pending: None,
        }
    }

    /// Writes the workload in batches every 50 ms for `length`, injecting a fault every 2 to
    /// 5 s, and goes on until the last fail point has fired; returns the events written.
    async fn write_under_faults(&mut self, stack: &mut Stack, length: Duration) -> usize {
        let seed = self.seed;
        let workload = Workload {
            users: 60,
            orders: 60,
            events_per_aggregate: 1_000,
            seed,
        };
        let events = stack.db().collection::<Document>("events");
        let mut generator = Generator::new(workload, "");
        let started = Instant::now();
        let mut written = 0usize;
        let mut next_fault = Instant::now() + Duration::from_secs(2);
        let mut ticker = tokio::time::interval(Duration::from_millis(50));
        while started.elapsed() < length || self.pending.is_some() {
            ticker.tick().await;
            if let Err(e) = stack.check_alive() {
                panic!("seed {seed}: {e}");
            }
            let batch = generator.next_batch(10);
            written += batch.len();
            insert(&events, batch).await.unwrap();
            if self.pending.is_some() {
                self.check_the_pending_fail_point(stack).await;
                continue;
            }
            if Instant::now() < next_fault || started.elapsed() >= length {
                continue;
            }
            next_fault = Instant::now() + Duration::from_millis(self.rng.random_range(2000..5000));
            let fault = pick(&mut self.rng, stack.projectors.len());
            println!(
                "[{:>5.1}s] {written} events written; injecting {fault:?}",
                started.elapsed().as_secs_f64()
            );
            self.inject(fault, stack).await;
        }
        written
    }

    /// Records the pending fail point as injected once its daemon's retries moved (and lifts
    /// it); fails the test if they have not within 60 s.
    async fn check_the_pending_fail_point(&mut self, stack: &Stack) {
        let seed = self.seed;
        let Some(p) = self.pending.take() else {
            return;
        };
        let now = p.reading(stack).await;
        if now > p.before {
            stack.mongo.disable_fail_point("failCommand").await.unwrap();
            self.injected
                .push((p.fault, format!("{} retries {} -> {now}", p.who, p.before)));
        } else {
            assert!(
                p.since.elapsed() < Duration::from_secs(60),
                "seed {seed}: {:?} never fired ({} retries stayed at {})",
                p.fault,
                p.who,
                p.before
            );
            self.pending = Some(p);
        }
    }

    async fn inject(&mut self, fault: Fault, stack: &mut Stack) {
        match fault {
            Fault::KillProducer => {
                let mut p = stack.producer.take().expect("a producer runs");
                self.injected.push((fault, killed(&mut p).await));
                stack.spawn_producer().await.unwrap();
            }
            Fault::KillProjector(slot) => {
                let mut p = stack.projectors[slot].take().expect("the projector runs");
                self.injected.push((fault, killed(&mut p).await));
                stack.spawn_projector(slot).await.unwrap();
            }
            Fault::BrokerOutage(d) => match broker_outage(stack, d, self.seed).await {
                Ok(proof) => self.injected.push((fault, proof)),
                Err(why) => self.not_injected.push((fault, why)),
            },
            Fault::FailUpdates => {
                // Scoped to the projectors: their read-model writes fail, the driver's single
                // retry of a retryable write absorbs at most one of each pair, and the rest
                // reach the worker's own retry loop, which counts them. Heartbeats are updates
                // too and fail silently (the next beat rewrites them), so there are enough
                // failures for the workers even when they are quiet for a while.
                let p = Pending::new(fault, Who::Projectors, stack).await;
                stack
                    .mongo
                    .configure_fail_point(
                        "failCommand",
                        doc! {"mode": {"times": 12}, "data": {"failCommands": ["update"], "appName": "ordo-projector", "errorCode": 91, "errorLabels": ["RetryableWriteError"]}},
                    )
                    .await
                    .unwrap();
                self.pending = Some(p);
            }
            Fault::FailGetMore => {
                // Scoped to the producer: its change stream's getMore fails with an error the
                // driver does not resume by itself (no ResumableChangeStreamError label), so
                // the producer reopens the stream from its last token and counts the retry.
                let p = Pending::new(fault, Who::Producer, stack).await;
                stack
                    .mongo
                    .configure_fail_point(
                        "failCommand",
                        doc! {"mode": {"times": 1}, "data": {"failCommands": ["getMore"], "appName": "ordo-producer", "errorCode": 6, "errorLabels": []}},
                    )
                    .await
                    .unwrap();
                self.pending = Some(p);
            }
        }
    }

    fn report(&self) {
        for (fault, proof) in &self.injected {
            println!("injected {fault:?}: {proof}");
        }
        for (fault, why) in &self.not_injected {
            println!("not injected {fault:?}: {why}");
        }
    }
}

/// Stops the broker for `d` and starts it again, proving it dropped every connection and the
/// daemons reconnected; returns the proof, or why it cannot be done (an external broker).
async fn broker_outage(stack: &Stack, d: Duration, seed: u64) -> Result<String, &'static str> {
    let Ok(emulator) = stack.bus.emulator() else {
        return Err("an external broker cannot be stopped here");
    };
    let before = emulator.stats().connections;
    emulator.suspend().await;
    let during = emulator.stats().connections;
    assert_eq!(during, 0, "seed {seed}: the outage left connections open");
    // The outage itself is the fault: the daemons must ride it out.
    tokio::time::sleep(d).await;
    emulator.resume().await.unwrap();
    let after = ordo_testkit::wait_for(Duration::from_secs(60), || async move {
        let n = emulator.stats().connections;
        (n > 0).then_some(n)
    })
    .await;
    Ok(format!(
        "broker connections {before} -> {during} -> {after}"
    ))
}

/// SIGKILLs a daemon and proves it died of it; returns the proof.
async fn killed(d: &mut ordo_testkit::Daemon) -> String {
    let pid = d.pid();
    d.kill9().unwrap();
    let status = d.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.signal(), Some(9), "pid {pid}: {status:?}");
    format!("pid {pid} killed by signal 9")
}

/// Whose retries counter proves a fail point fired.
#[derive(Debug, Clone, Copy)]
enum Who {
    Producer,
    Projectors,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Who::Producer => "producer",
            Who::Projectors => "projectors'",
        })
    }
}

/// A fail point set and not yet proven to have fired.
struct Pending {
    fault: Fault,
    who: Who,
    before: f64,
    since: Instant,
}

impl Pending {
    async fn new(fault: Fault, who: Who, stack: &Stack) -> Self {
        let mut p = Self {
            fault,
            who,
            before: 0.0,
            since: Instant::now(),
        };
        // `+ 0.0` turns the -0.0 of an empty sum into 0.
        p.before = p.reading(stack).await + 0.0;
        p
    }

    async fn reading(&self, stack: &Stack) -> f64 {
        match self.who {
            Who::Producer => match &stack.producer {
                Some(d) => d.metric(m::RETRIES).await,
                None => 0.0,
            },
            Who::Projectors => {
                let mut total = 0.0;
                for d in stack.projectors.iter().flatten() {
                    total += d.metric(m::RETRIES).await;
                }
                total
            }
        }
    }
}
