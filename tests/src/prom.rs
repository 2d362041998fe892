//! Reading the daemons' `/metrics` (Prometheus text format).

pub use ordo_testkit::prom::sum;

/// Quantile `q` (0..1) estimated from a histogram's cumulative buckets, summed over label
/// sets; the upper bound of the first bucket reaching the rank. None without samples.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for l in text.lines().filter(|l| l.starts_with(&bucket)) {
        let Some(le_start) = l.find("le=\"") else {
            continue;
        };
        let rest = &l[le_start + 4..];
        let Some(le_end) = rest.find('"') else {
            continue;
        };
        let le = match &rest[..le_end] {
            "+Inf" => f64::INFINITY,
            v => match v.parse() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        let Some(count) = l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()) else {
            continue;
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

    const TEXT: &str = "# TYPE ordo_events_applied_total counter
ordo_events_applied_total 40
ordo_dead_lettered_total{reason=\"poison\"} 2
ordo_dead_lettered_total{reason=\"blocked\"} 3
ordo_apply_latency_seconds_bucket{le=\"0.01\"} 5
ordo_apply_latency_seconds_bucket{le=\"0.1\"} 9
ordo_apply_latency_seconds_bucket{le=\"+Inf\"} 10
";

    #[test]
    fn sums_and_quantiles() {
        assert_eq!(sum(TEXT, "ordo_events_applied_total"), 40.0);
        assert_eq!(sum(TEXT, "ordo_dead_lettered_total"), 5.0);
        assert_eq!(sum(TEXT, "missing"), 0.0);
        assert_eq!(
            histogram_quantile(TEXT, "ordo_apply_latency_seconds", 0.5),
            Some(0.01)
        );
        assert_eq!(
            histogram_quantile(TEXT, "ordo_apply_latency_seconds", 0.9),
            Some(0.1)
        );
        assert_eq!(
            histogram_quantile(TEXT, "ordo_apply_latency_seconds", 0.99),
            Some(f64::INFINITY)
        );
        assert_eq!(histogram_quantile(TEXT, "nothing", 0.5), None);
    }
}
