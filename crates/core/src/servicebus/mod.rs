//! servicebus
