//! The projector side of Service Bus: session receivers.
