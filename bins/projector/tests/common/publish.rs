//! Publishing events by the message contract, as the producer would, and raw (poison) bodies.

use std::time::Duration;

use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusSenderOptions,
};
use mongodb::bson::Document;
use ordo_core::envelope::{Envelope, EventFields, PropertyValue, WireMessage};
use ordo_core::secret::Secret;
use ordo_core::servicebus::sender::{Publisher, PublisherFactory, ServiceBusPublisherFactory};

use super::{Env, TOPIC};

impl Env {
    /// Publishes `events` by the message contract, one batch per aggregate run.
    pub async fn publish(&self, events: &[Document]) {
        // Boxed: the publisher's future is large, and the largest tests overflowed the test
        // thread's stack in debug builds with it inline.
        Box::pin(self.publish_with(events, "")).await
    }

    /// Like [`Env::publish`], with `suffix` appended to every MessageId: a redelivery the
    /// broker's duplicate detection does not catch (e.g. after its window), so the projector's
    /// version rule must.
    ///
    /// Publishes through the producer's own adapter, one message per send: the test topic is
    /// partitioned with duplicate detection, where Service Bus refuses a batch of distinct
    /// MessageIds. A send that fails or gets no answer within its timeout is retried on a fresh
    /// publisher: the broker may or may not have taken it, and a resend is removed by MessageId
    /// duplicate detection (and, past that, by the projector's version rule). The emulator
    /// sometimes leaves a send of a message it did enqueue without an answer, so the timeout
    /// is short: the emulator answers in milliseconds, and a resend costs nothing.
    pub async fn publish_with(&self, events: &[Document], suffix: &str) {
        let factory = ServiceBusPublisherFactory {
            connection_string: Secret::new(self.conn().to_owned()),
            topic: TOPIC.to_string(),
            identifier: "projector-test".to_string(),
            max_batch_bytes: None,
            send_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            connections: Default::default(),
        };
        let mut runs: Vec<Vec<WireMessage>> = Vec::new();
        let mut run_session = String::new();
        for e in events {
            let mut m = Envelope::from_event(e, &EventFields::default(), "db", "events")
                .unwrap()
                .to_message();
            m.message_id.push_str(suffix);
            if m.session_id != run_session || runs.last().is_none_or(|r| !r.is_empty()) {
                runs.push(Vec::new());
            }
            run_session = m.session_id.clone();
            runs.last_mut().unwrap().push(m);
        }
        let mut publisher = None;
        for run in runs {
            let mut failures = Vec::new();
            loop {
                assert!(
                    failures.len() < 8,
                    "publishing {} failed 8 times: {failures:?}",
                    run[0].message_id
                );
                let p = match publisher.as_mut() {
                    Some(p) => p,
                    None => match factory.open().await {
                        Ok(p) => publisher.insert(p),
                        Err(e) => {
                            failures.push(e.to_string());
                            continue;
                        }
                    },
                };
                match p.publish(&run).await {
                    Ok(()) => break,
                    Err(e) => {
                        failures.push(e.to_string());
                        publisher = None;
                    }
                }
            }
            if !failures.is_empty() {
                eprintln!(
                    "publish of {}.. needed {} retries: {failures:?}",
                    run[0].message_id,
                    failures.len()
                );
            }
        }
    }

    /// Publishes raw bodies (poison) in `session`.
    pub async fn publish_raw(&self, session: &str, message_id: &str, body: &[u8]) {
        let mut client = ServiceBusClient::unsecured()
            .new_from_connection_string(self.conn(), ServiceBusClientOptions::default())
            .await
            .unwrap();
        let mut sender = client
            .create_sender(TOPIC, ServiceBusSenderOptions::default())
            .await
            .unwrap();
        let mut m = ServiceBusMessage::new(body.to_vec());
        m.set_message_id(message_id.to_string()).unwrap();
        m.set_session_id(Some(session.to_string())).unwrap();
        m.set_partition_key(Some(session.to_string())).unwrap();
        m.set_content_type("application/json".to_string());
        sender.send_message(m).await.unwrap();
        sender.dispose().await.unwrap();
        client.dispose().await.unwrap();
    }
}

/// The service bus message for a source event, exactly as the contract says.
pub fn to_message(event: &Document) -> ServiceBusMessage {
    let env = Envelope::from_event(event, &EventFields::default(), "db", "events").unwrap();
    let wire = env.to_message();
    let mut m = ServiceBusMessage::new(wire.body.clone());
    m.set_message_id(wire.message_id.clone()).unwrap();
    m.set_session_id(Some(wire.session_id.clone())).unwrap();
    m.set_partition_key(Some(wire.session_id.clone())).unwrap();
    m.set_subject(wire.subject.clone());
    m.set_content_type(wire.content_type.to_string());
    let props = m
        .application_properties_mut()
        .get_or_insert_with(Default::default);
    for (k, v) in &wire.properties {
        let v = match v {
            PropertyValue::String(s) => s.clone().into(),
            PropertyValue::Int(i) => (*i).into(),
            PropertyValue::Long(l) => (*l).into(),
        };
        props.0.insert(k.clone(), v);
    }
    m
}
