//! End-to-end harness of ordo: sample workloads, metric scraping, reports.
//!
//! Used by the end-to-end tests in `tests/tests`, the demo (`ordo-demo`, the README's first
//! command) and the end-to-end benchmark (`ordo-bench`).

pub mod chart;
pub mod prom;
pub mod sample;
pub mod stack;
pub mod stats;
