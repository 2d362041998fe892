//! The producer's promises under input and faults nobody here wrote, one module per behaviour:
//! ids and messages at the size limits, restarts that lose nothing, readiness that follows each
//! dependency, the send modes, a task that fails, shutdown while the database hangs, the
//! event index, and invalid events parked or halted on.

#[path = "../common/mod.rs"]
mod common;

mod failing_tasks;
mod index;
mod parking;
mod readiness;
mod restarts;
mod send_modes;
mod shutdown;
mod sizes;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};
use ordo_core::metrics as names;
use ordo_core::servicebus::sender::SendMode;
use ordo_testkit::wait_until;

const DEADLINE: Duration = Duration::from_secs(90);
