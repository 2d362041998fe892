//! The producer side of Service Bus: publishing [`crate::envelope::WireMessage`]s.
