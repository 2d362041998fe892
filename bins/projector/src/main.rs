use std::process::ExitCode;

/// Each session costs the AMQP client many small allocations (frames, links, channels), and
/// sessions come and go hundreds of times a second: mimalloc, as in the producer, took the
/// projector's CPU per 1,000 events from 122-130 ms to 118-120 (churn) and 46-50 to 43-44 (hot)
/// for 4-5 MiB more peak RSS (`ordo-bench`, 2 cores). A binary with projections of its own in
/// Rust (`main_with`) picks its own allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ordo_projector::cli::main_with(Vec::new())
}
