//! Reading a daemon's `/metrics` (Prometheus text format).

/// Every sample of the text as (metric, labels without braces, value).
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            Some((metric, labels.trim_end_matches('}'), value.parse().ok()?))
        })
}

/// Sum of every sample of metric `name` (all label sets), or 0 when absent.
pub fn sum(text: &str, name: &str) -> f64 {
    samples(text)
        .filter(|(metric, _, _)| *metric == name)
        .map(|(_, _, value)| value)
        .sum()
}

/// Sum of the samples of metric `name` whose labels include `label="value"`.
pub fn sum_where(text: &str, name: &str, (label, value): (&str, &str)) -> f64 {
    let wanted = format!("{label}=\"{value}\"");
    samples(text)
        .filter(|(metric, labels, _)| *metric == name && labels.split(',').any(|p| p == wanted))
        .map(|(_, _, value)| value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_label_set_of_exactly_that_metric() {
        let text = "# TYPE ordo_events_applied_total counter
ordo_events_applied_total 40
ordo_events_applied_total_extra 7
ordo_dead_lettered_total{reason=\"poison\"} 2
ordo_dead_lettered_total{reason=\"blocked\"} 3
";
        assert_eq!(sum(text, "ordo_events_applied_total"), 40.0);
        assert_eq!(sum(text, "ordo_dead_lettered_total"), 5.0);
        assert_eq!(sum(text, "missing"), 0.0);
    }

    #[test]
    fn sums_only_the_samples_with_that_label_value() {
        let text = "ordo_retries_total{operation=\"apply\",reason=\"transient\"} 2
ordo_retries_total{operation=\"accept\",reason=\"broker\"} 5
ordo_retries_total{operation=\"apply\",reason=\"database\"} 1
ordo_retries_total_x{operation=\"apply\"} 9
";
        let apply = ("operation", "apply");
        assert_eq!(sum_where(text, "ordo_retries_total", apply), 3.0);
        assert_eq!(
            sum_where(text, "ordo_retries_total", ("operation", "block")),
            0.0
        );
    }
}
