//! How large the workload-sized tests run: `ORDO_TEST_SCALE`, read here and nowhere else.
//!
//! The producer's publish tests and the projector's convergence test size their workload by
//! [`scale`]; every other test has a fixed size.

/// Environment variable choosing the workload size: unset (or empty) for the default, `full`
/// for five times as much.
pub const SCALE_ENV: &str = "ORDO_TEST_SCALE";

/// The size of the workload-sized tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The size every run uses unless told otherwise: quick enough for CI on two cores.
    Default,
    /// `ORDO_TEST_SCALE=full`: five times the default workload.
    Full,
}

impl Scale {
    /// How many times the default workload a test runs at this scale.
    pub fn factor(self) -> usize {
        match self {
            Scale::Default => 1,
            Scale::Full => 5,
        }
    }

    /// `n` (a default-size count: events, aggregates) at this scale.
    pub fn of(self, n: usize) -> usize {
        n * self.factor()
    }

    /// The scale a value of [`SCALE_ENV`] names; the error names the values there are.
    pub fn parse(value: &str) -> Result<Scale, String> {
        match value.trim() {
            "" | "default" => Ok(Scale::Default),
            "full" => Ok(Scale::Full),
            other => Err(format!(
                "{SCALE_ENV}={other:?}: expected \"full\" or \"default\" (or unset)"
            )),
        }
    }
}

/// The scale [`SCALE_ENV`] asks for. Panics on a value it does not know, so a typo does not
/// quietly run the default size.
pub fn scale() -> Scale {
    match std::env::var(SCALE_ENV) {
        Ok(value) => Scale::parse(&value).unwrap_or_else(|e| panic!("{e}")),
        Err(_) => Scale::Default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_is_five_times_the_default_and_unknown_values_are_refused() {
        assert_eq!(Scale::parse(""), Ok(Scale::Default));
        assert_eq!(Scale::parse("default"), Ok(Scale::Default));
        assert_eq!(Scale::parse("full"), Ok(Scale::Full));
        assert_eq!(Scale::Default.of(100), 100);
        assert_eq!(Scale::Full.of(100), 500);
        let refused = Scale::parse("300").unwrap_err();
        assert!(refused.contains("ORDO_TEST_SCALE=\"300\""), "{refused}");
    }
}
