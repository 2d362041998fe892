//! The unique (aggregateId, eventId) index on the events collection: created, created again when
//! dropped, or reported missing.

use super::*;

/// The producer creates the unique (aggregateId, eventId) index by default, and again within
/// `index_check_interval` when it is dropped; `ordo_events_index_enforced` follows. With
/// `create_indexes = false` it leaves the collection alone, warns and reports 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_index_is_created_or_reported() {
    let world = World::start().await;
    let events = world.events();
    let mut producer = world.spawn(ProducerSection {
        index_check_interval: Duration::from_secs(2),
        ..tuning()
    });
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let e = &events;
    wait_until(Duration::from_secs(20), || async move {
        e.list_index_names().await.is_ok_and(|names| {
            names
                .iter()
                .any(|n| n == ordo_core::indexes::EVENT_INDEX_NAME)
        })
    })
    .await;
    assert!(producer
        .logs()
        .contains("events index: unique index created"));
    assert_eq!(producer.metric(names::EVENTS_INDEX_ENFORCED).await, 1.0);
    // Dropped by hand (or a restore without it): the next check, within
    // `index_check_interval`, creates it again.
    events
        .drop_index(ordo_core::indexes::EVENT_INDEX_NAME)
        .await
        .unwrap();
    let p = &producer;
    wait_until(Duration::from_secs(30), || async move {
        p.logs()
            .matches("events index: unique index created")
            .count()
            == 2
    })
    .await;
    let names = events.list_index_names().await.unwrap();
    assert!(
        names
            .iter()
            .any(|n| n == ordo_core::indexes::EVENT_INDEX_NAME),
        "{names:?}"
    );
    stop(&mut producer).await;

    let other = World::start().await;
    let health = ordo_testkit::free_health_addr();
    let config = other
        .config_file(health, &tuning())
        .set("mongodb", "create_indexes", false)
        .render();
    let mut producer = ordo_testkit::Daemon::spawn(
        &ordo_testkit::bin_path("ordo-producer"),
        &config,
        health,
        &[],
    )
    .unwrap();
    producer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let p = &producer;
    wait_until(Duration::from_secs(20), || async move {
        p.logs().contains("events index: MISSING")
    })
    .await;
    assert_eq!(producer.metric(names::EVENTS_INDEX_ENFORCED).await, 0.0);
    let names = other.events().list_index_names().await.unwrap_or_default();
    assert!(
        !names
            .iter()
            .any(|n| n == ordo_core::indexes::EVENT_INDEX_NAME),
        "{names:?}"
    );
    stop(&mut producer).await;
}
