//! The two ways a projection fails: a mistake in its definition, found at start, and an event it
//! cannot apply, found at run time (a poison message).

/// A projection definition that cannot work. Names the projection, the event type and the key,
/// so the operator finds the line in `projections.toml` at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("projection `{projection}`{}: {key}: {message}", event_type.as_ref().map(|t| format!(", event `{t}`")).unwrap_or_default())]
pub struct RuleError {
    /// The projection's name (or its index when it has none).
    pub projection: String,
    /// The event type whose rule is wrong, when the mistake is in a rule.
    pub event_type: Option<String>,
    /// The offending key, e.g. `inc.total` or `collection`.
    pub key: String,
    /// What is wrong, showing the value.
    pub message: String,
}

/// An event a projection cannot apply. Never retryable: the same event fails the same way on
/// every replica, so it is dead-lettered and its aggregate blocked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("projection `{projection}` cannot apply {event_type} v{event_id}: {message}")]
pub struct ApplyError {
    /// The projection that failed.
    pub projection: String,
    /// The event's type.
    pub event_type: String,
    /// The event's version.
    pub event_id: i64,
    /// What went wrong, naming the path or field.
    pub message: String,
}
