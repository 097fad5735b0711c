//! Reading a scrape back: one plain HTTP GET of `/metrics` and the text format's samples, for
//! tests and tools (`swapd bench`, the soak).
/// One plain HTTP/1.0 GET of `http://HOST/PATH` (a scrape needs no more): the status line
/// and the body.
pub async fn fetch(host: &str, path: &str) -> std::io::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(host).await?;
    conn.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.to_string()))
}

/// One sample of a scrape, parsed (for tests and tools).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the text exposition format's samples (comments skipped). Label values may not
/// hold `"` or `,` here; swapd's never do.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (head, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => {
                    let body = rest.strip_suffix('}')?;
                    let labels = body
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .filter_map(|kv| {
                            let (k, v) = kv.split_once('=')?;
                            Some((k.to_string(), v.trim_matches('"').to_string()))
                        })
                        .collect();
                    (n.to_string(), labels)
                }
                None => (head.to_string(), Vec::new()),
            };
            Some(Sample {
                name,
                labels,
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_labels_and_values() {
        let s = parse("# HELP x y\nx_total{a=\"1\",b=\"two\"} 3\ny 4.5\n# EOF\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label("b"), Some("two"));
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].name, "y");
    }
}
