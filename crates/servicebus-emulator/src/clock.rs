//! The process clock of the emulator.

/// Current wall-clock time in Unix milliseconds; locks and TTLs are wall-clock like the service,
/// and clients compare `locked-until` timestamps with their own wall clock.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
