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

/// Quantile `q` (0..1) estimated from histogram `name`'s cumulative buckets, summed over label
/// sets: the upper bound of the first bucket reaching the rank. `None` without samples.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for (_, labels, count) in samples(text).filter(|(metric, _, _)| *metric == bucket) {
        let Some(le) = labels
            .split(',')
            .find_map(|p| p.strip_prefix("le=\""))
            .map(|v| v.trim_end_matches('"'))
        else {
            continue;
        };
        let le = match le {
            "+Inf" => f64::INFINITY,
            v => match v.parse() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(entry) => entry.1 += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    buckets.iter().find(|(_, c)| *c >= rank).map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds_summed_over_label_sets() {
        let text = "ordo_apply_latency_seconds_bucket{worker=\"a\",le=\"0.01\"} 3
ordo_apply_latency_seconds_bucket{worker=\"a\",le=\"0.1\"} 5
ordo_apply_latency_seconds_bucket{worker=\"a\",le=\"+Inf\"} 5
ordo_apply_latency_seconds_bucket{worker=\"b\",le=\"0.01\"} 2
ordo_apply_latency_seconds_bucket{worker=\"b\",le=\"0.1\"} 4
ordo_apply_latency_seconds_bucket{worker=\"b\",le=\"+Inf\"} 5
ordo_apply_latency_seconds_count 10
";
        let q = |x| histogram_quantile(text, "ordo_apply_latency_seconds", x);
        assert_eq!(q(0.5), Some(0.01));
        assert_eq!(q(0.9), Some(0.1));
        assert_eq!(q(0.99), Some(f64::INFINITY));
        assert_eq!(histogram_quantile(text, "nothing", 0.5), None);
    }

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
        let text = "ordo_retries_total{operation=\"apply\",reason=\"transient_server_error\"} 2
ordo_retries_total{operation=\"accept\",reason=\"broker\"} 5
ordo_retries_total{operation=\"apply\",reason=\"network\"} 1
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
