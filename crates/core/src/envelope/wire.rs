//! Writing an [`Envelope`] as the Service Bus message: the JSON body, the subject and the
//! typed application properties, independent of the client crate.

use super::{message_id, property, session_id, Envelope, CONTENT_TYPE, ENVELOPE_VERSION};

impl Envelope {
    /// The body bytes.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }

    /// The Service Bus message for this envelope.
    pub fn to_message(&self) -> WireMessage {
        let mut properties = vec![
            (
                property::ENVELOPE.to_string(),
                PropertyValue::Int(ENVELOPE_VERSION),
            ),
            (
                property::AGGREGATE_ID.to_string(),
                PropertyValue::String(self.aggregate_id.clone()),
            ),
        ];
        if let Some(t) = &self.aggregate_type {
            properties.push((
                property::AGGREGATE_TYPE.to_string(),
                PropertyValue::String(t.clone()),
            ));
        }
        properties.push((
            property::EVENT_TYPE.to_string(),
            PropertyValue::String(self.event_type.clone()),
        ));
        properties.push((
            property::EVENT_ID.to_string(),
            PropertyValue::Long(self.event_id),
        ));
        WireMessage {
            session_id: session_id(&self.aggregate_id),
            message_id: message_id(&self.aggregate_id, self.event_id),
            subject: self.event_type.clone(),
            content_type: CONTENT_TYPE,
            body: self.to_body(),
            properties,
        }
    }
}

/// A typed application property value (AMQP types matter to subscription filters).
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    /// AMQP string.
    String(String),
    /// AMQP int.
    Int(i32),
    /// AMQP long.
    Long(i64),
}

/// Everything the producer sets on a Service Bus message, independent of the client crate.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMessage {
    /// SessionId and PartitionKey (equal, as partitioned session entities require).
    pub session_id: String,
    /// MessageId, the duplicate-detection key.
    pub message_id: String,
    /// Subject (label) = eventType.
    pub subject: String,
    /// Always [`CONTENT_TYPE`].
    pub content_type: &'static str,
    /// The JSON envelope.
    pub body: Vec<u8>,
    /// Application properties, in a stable order.
    pub properties: Vec<(String, PropertyValue)>,
}

impl WireMessage {
    /// Approximate encoded size (body plus ids and properties), a cheap upper-side estimate;
    /// [`fits`](crate::servicebus::sender::fits) skips encoding a message far below the limit by it.
    pub fn approx_size(&self) -> usize {
        let props: usize = self
            .properties
            .iter()
            .map(|(k, v)| {
                k.len()
                    + match v {
                        PropertyValue::String(s) => s.len() + 5,
                        PropertyValue::Int(_) => 5,
                        PropertyValue::Long(_) => 9,
                    }
            })
            .sum();
        self.body.len()
            + 2 * self.session_id.len()
            + self.message_id.len()
            + self.subject.len()
            + self.content_type.len()
            + props
            + 64
    }
}
