//! Chaos under load: the whole pipeline as real processes, with the producer and projectors
//! killed (SIGKILL) at random, the broker stopped and restarted, and MongoDB fail points
//! injected, while events keep arriving. Afterwards every read model must equal the fold of
//! the events collection, no aggregate may be blocked, and the dead-letter queue must be empty
//! (the workload has no poison).
//!
//! Seeded: `ORDO_CHAOS_SEED=N` replays a run (the seed is printed first). The default length
//! fits CI; `ORDO_CHAOS_SECS=600` makes it a soak.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use ordo_e2e::sample::{insert, Generator, Workload};
use ordo_e2e::stack::Stack;
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
    let mut rng = StdRng::seed_from_u64(seed);

    let mut stack = Stack::start(Duration::from_secs(5)).await.unwrap();
    stack.producer_extra = "lease_ttl = \"3s\"\ncheckpoint_interval = \"200ms\"\n".into();
    stack.projector_extra = "max_concurrent_sessions = 16\n".into();
    stack.spawn_producer().await.unwrap();
    for slot in 0..2 {
        stack.spawn_projector(slot).await.unwrap();
    }

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
    let mut faults = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(secs) {
        ticker.tick().await;
        if let Err(e) = stack.check_alive() {
            panic!("seed {seed}: {e}");
        }
        let batch = generator.next_batch(10);
        written += batch.len();
        insert(&events, batch).await.unwrap();
        if Instant::now() < next_fault {
            continue;
        }
        next_fault = Instant::now() + Duration::from_millis(rng.random_range(2000..5000));
        let fault = pick(&mut rng, stack.projectors.len());
        faults.push(fault);
        println!(
            "[{:>5.1}s] {written} events written; injecting {fault:?}",
            started.elapsed().as_secs_f64()
        );
        match fault {
            Fault::KillProducer => {
                if let Some(p) = stack.producer.take() {
                    p.kill9().unwrap();
                }
                stack.spawn_producer().await.unwrap();
            }
            Fault::KillProjector(slot) => {
                if let Some(p) = stack.projectors[slot].take() {
                    p.kill9().unwrap();
                }
                stack.spawn_projector(slot).await.unwrap();
            }
            Fault::BrokerOutage(d) => match stack.bus.suspend().await {
                Ok(()) => {
                    // The outage itself is the fault: the daemons must ride it out.
                    tokio::time::sleep(d).await;
                    stack.bus.resume().await.unwrap().unwrap();
                }
                Err(skip) => skip.skip(),
            },
            Fault::FailUpdates => {
                stack
                    .mongo
                    .configure_fail_point(
                        "failCommand",
                        doc! {"mode": {"times": 5}, "data": {"failCommands": ["update"], "errorCode": 91, "errorLabels": ["RetryableWriteError"]}},
                    )
                    .await
                    .unwrap();
            }
            Fault::FailGetMore => {
                stack
                    .mongo
                    .configure_fail_point(
                        "failCommand",
                        doc! {"mode": {"times": 1}, "data": {"failCommands": ["getMore"], "closeConnection": true}},
                    )
                    .await
                    .unwrap();
            }
        }
    }
    stack.mongo.disable_fail_point("failCommand").await.unwrap();
    println!("load stopped: {written} events, faults {faults:?}");

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Err(e) = stack.check_alive() {
            panic!("seed {seed}: {e}");
        }
        let (done, aggregates) = stack.caught_up().await.unwrap();
        if done == aggregates {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read models did not catch up: {done}/{aggregates} (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let verdict = stack.verify().await.unwrap();
    assert!(
        verdict.ok(),
        "seed {seed}: {} read models differ from the fold, e.g. {:?}",
        verdict.mismatches.len(),
        verdict.mismatches.first()
    );
    assert_eq!(verdict.events, written, "every written event was folded");
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
