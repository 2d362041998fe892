//! A Service Bus-compatible AMQP 1.0 broker for tests and local development.
