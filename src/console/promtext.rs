//! Just enough of the Prometheus text format to read the order counters and latency
//! buckets out of another node's `/metrics`, and the quantile rule Prometheus's
//! `histogram_quantile` uses on buckets.

use std::collections::BTreeMap;

/// One sample line: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// The samples of metrics named in `names`; other lines, comments and lines it cannot
/// read are skipped (the text comes from another node: it may be anything).
pub fn samples(text: &str, names: &[&str]) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(parse_line).filter(|s| names.contains(&s.name.as_str())).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i..]),
        None => line.split_once(' ')?,
    };
    let (labels, value) = if let Some(body) = rest.strip_prefix('{') {
        let end = closing_brace(body)?;
        (parse_labels(&body[..end])?, &body[end + 1..])
    } else {
        (BTreeMap::new(), rest)
    };
    let value = value.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name: name.trim().to_string(), labels, value })
}

/// Index of the `}` that closes the label set, skipping braces inside quoted values.
fn closing_brace(body: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    while !s.trim().is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => value.push(match chars.next()?.1 {
                    'n' => '\n',
                    c => c,
                }),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(key.trim().trim_start_matches(',').trim().to_string(), value);
        s = rest[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count) pairs, with
/// linear interpolation inside the bucket as Prometheus does; `None` without observations.
/// A quantile in the `+Inf` bucket is the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in b {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            return Some(if inside > 0.0 { lower + (bound - lower) * (rank - below) / inside } else { bound });
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP agora_http_requests_total HTTP requests by route and status
# TYPE agora_http_requests_total counter
agora_http_requests_total{dc="dc1",node="dc1-n1",route="/v1/orders",status="201"} 42
agora_http_requests_total{dc="dc1",node="dc1-n1",route="/v1/orders",status="409"} 3
agora_http_request_duration_seconds_bucket{dc="dc1",le="0.01",node="dc1-n1",route="/v1/orders"} 40
agora_http_request_duration_seconds_bucket{dc="dc1",le="+Inf",node="dc1-n1",route="/v1/orders"} 45
weird{a="x\"}y",b="2"} 7
not a metric line at all
agora_raft_term 5
"#;

    #[test]
    fn reads_labelled_and_bare_samples_and_skips_the_rest() {
        let s = samples(TEXT, &["agora_http_requests_total", "agora_raft_term", "weird"]);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[0].label("status"), Some("201"));
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[2].label("a"), Some("x\"}y"));
        assert_eq!(s[2].label("b"), Some("2"));
        assert_eq!(s[3].name, "agora_raft_term");
        let b = samples(TEXT, &["agora_http_request_duration_seconds_bucket"]);
        assert_eq!(b[1].label("le"), Some("+Inf"));
        assert!(samples("x{a=\"unterminated} 1\nx{} zero\n", &["x"]).is_empty());
    }

    #[test]
    fn quantile_interpolates_like_prometheus() {
        let b = [(0.01, 50.0), (0.1, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-9);
        assert!((quantile(0.99, &b).unwrap() - 0.0982).abs() < 1e-9);
        assert_eq!(quantile(0.99, &[(0.01, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.99, &[(0.01, 1.0), (f64::INFINITY, 10.0)]), Some(0.01));
    }
}
