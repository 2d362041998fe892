//! Reading a daemon's `/metrics` (Prometheus text format).

/// Sum of every sample of metric `name` (all label sets), or 0 when absent.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Sum of the samples of metric `name` whose labels include `label="value"`.
pub fn sum_where(text: &str, name: &str, (label, value): (&str, &str)) -> f64 {
    let wanted = format!("{label}=\"{value}\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, sample) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{')?;
            let matches = metric == name
                && labels
                    .trim_end_matches('}')
                    .split(',')
                    .any(|pair| pair == wanted);
            matches.then(|| sample.parse::<f64>().ok())?
        })
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
