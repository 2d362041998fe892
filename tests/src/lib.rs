//! End-to-end harness of ordo: sample workloads, the stack of stand-ins and daemons, reports.
//!
//! Used by the end-to-end tests in `tests/tests`, the demo (`ordo-demo`, the README's first
//! command) and the end-to-end benchmark (`ordo-bench`).
//!
//! Module map: [`sample`] (the sample events), [`stack`] (stand-ins and daemons started
//! together, and the verdict on their read models), [`stats`] and [`chart`] (percentiles and
//! the SVG of a benchmark report). Reading `/metrics` is `ordo_testkit::prom`.

pub mod chart;
pub mod sample;
pub mod stack;
pub mod stats;
