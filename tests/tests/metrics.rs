//! The Prometheus endpoints (`--metrics-listen`): both daemons export the figures of their
//! status, every exported name is documented in docs/operations.md, the Grafana dashboard in
//! deploy/grafana queries only names the endpoints export, and a bad request gets an error
//! without stopping the endpoint.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvmirror_e2e::{require_mount, wait_until, Harness, HarnessOptions};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The address a daemon logged `serving metrics on http://ADDR/metrics` with (waits for it).
fn metrics_addr(log: &Path) -> SocketAddr {
    const MARK: &str = "serving metrics on http://";
    let mut addr = None;
    wait_until(
        &format!("the metrics line in {}", log.display()),
        TIMEOUT,
        || {
            let text = fs::read_to_string(log).unwrap_or_default();
            addr = text.lines().find_map(|l| {
                let rest = &l[l.find(MARK)? + MARK.len()..];
                rest[..rest.find("/metrics")?].parse().ok()
            });
            addr.is_some()
        },
    );
    addr.expect("found above")
}

/// One HTTP exchange: `request` sent as is, the whole answer read (the server closes).
fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(request)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The status code of an HTTP answer.
fn status_code(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// One sample of a scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: Vec<Sample>,
    /// `# TYPE` lines: (family, type).
    families: Vec<(String, String)>,
}

impl Scrape {
    /// The value of `name` whose labels contain `label` (e.g. `source="alpha"`, or "").
    fn get(&self, name: &str, label: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.contains(label))
            .map(|s| s.value)
    }

    #[track_caller]
    fn value(&self, name: &str, label: &str) -> f64 {
        self.get(name, label)
            .unwrap_or_else(|| panic!("no sample {name} with {label:?} in\n{}", self.text))
    }

    /// Every sample name.
    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// The names a family's samples are documented under: `X_total` for counters, `X_info`
    /// for info metrics, `X` for gauges and histograms (whose samples are `X_bucket`, ...).
    fn documented_names(&self) -> Vec<String> {
        self.families
            .iter()
            .map(|(name, kind)| match kind.as_str() {
                "counter" => format!("{name}_total"),
                "info" => format!("{name}_info"),
                _ => name.clone(),
            })
            .collect()
    }
}

/// `GET /metrics`, checked to be a 200 in the OpenMetrics format, parsed.
fn scrape(addr: SocketAddr) -> Scrape {
    let answer = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    assert_eq!(status_code(&answer), 200, "{answer}");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head: {answer:?}"));
    assert!(
        head.lines().any(|l| l.eq_ignore_ascii_case(
            "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        )),
        "content type: {head}"
    );
    assert!(
        body.ends_with("# EOF\n"),
        "an OpenMetrics body ends with # EOF: {body}"
    );
    let mut samples = Vec::new();
    let mut families = Vec::new();
    for line in body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').expect("# TYPE NAME KIND");
            families.push((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("NAME VALUE");
        let (name, labels) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        samples.push(Sample {
            name: name.to_string(),
            labels: labels.to_string(),
            value: value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        });
    }
    Scrape {
        text: body.to_string(),
        samples,
        families,
    }
}

/// The "## Metrics" section of docs/operations.md.
fn metrics_doc() -> String {
    let text = fs::read_to_string(repo().join("docs/operations.md")).expect("docs/operations.md");
    let start = text
        .find("\n## Metrics")
        .expect("docs/operations.md has a section ## Metrics");
    let rest = &text[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_string()
}

#[track_caller]
fn assert_documented(scrape: &Scrape, doc: &str) {
    for name in scrape.documented_names() {
        assert!(
            doc.contains(&format!("`{name}`")),
            "metric {name} is exported but not documented in docs/operations.md (## Metrics)"
        );
    }
}

/// Writes a config file `NAME.toml` holding `text` in a new temp dir (kept alive by the
/// returned guard).
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    fs::write(&path, text).expect("write config");
    (dir, path)
}

/// The source's and the destination's metrics addresses.
fn endpoints(h: &Harness) -> (SocketAddr, SocketAddr) {
    let source = h.source.as_ref().expect("a mounted source");
    (
        metrics_addr(&source.daemon.log),
        metrics_addr(&h.log_dir.join("fs-dest.log")),
    )
}

#[test]
fn both_daemons_export_the_status_figures() {
    const TEST: &str = "metrics_figures";
    require_mount!(TEST);
    // Both endpoints are set in config files (the key with '_' for the source, '-' for the
    // destination): the file's keys are the long option names.
    let (_keep_s, source_config) = config_file("metrics_listen = \"127.0.0.1:0\"\n");
    let (_keep_d, dest_config) = config_file("metrics-listen = \"127.0.0.1:0\"\n");
    let h = Harness::start(
        HarnessOptions::new(TEST)
            .source_args(["--config".to_string(), source_config.display().to_string()])
            .dest_args(["--config".to_string(), dest_config.display().to_string()]),
    );
    let (src, dst) = endpoints(&h);
    let doc = metrics_doc();

    let s = scrape(src);
    assert_eq!(s.value("nvmirror_source_link_up", "source=\"alpha\""), 1.0);
    let d = scrape(dst);
    assert_eq!(d.value("nvmirror_dest_link_up", "source=\"alpha\""), 1.0);
    assert_eq!(d.value("nvmirror_dest_sources", ""), 1.0);

    for i in 0..20 {
        fs::write(h.mnt().join(format!("file-{i}")), vec![i as u8; 50_000]).expect("write");
    }
    fs::create_dir(h.mnt().join("dir")).expect("mkdir");
    h.cp();
    let status = h.status();
    assert!(status.cp_count >= 1, "{}", status.raw);

    // Counters only grow: what status said before the scrape is a floor.
    let s = scrape(src);
    let a = "source=\"alpha\"";
    let logged = s.value("nvmirror_source_records_logged_total", a);
    assert!(
        logged >= status.last_logged_seq as f64 && logged > 0.0,
        "{}",
        s.text
    );
    assert!(s.value("nvmirror_source_records_mirrored_total", a) > 0.0);
    assert!(s.value("nvmirror_source_bytes_mirrored_total", a) >= 1_000_000.0);
    assert!(s.value("nvmirror_source_cps_total", a) >= status.cp_count as f64);
    assert!(s.value("nvmirror_source_cp_duration_seconds_count", a) >= 1.0);
    assert!(s.value("nvmirror_source_last_cp_duration_seconds", a) > 0.0);
    assert!(s.value("nvmirror_source_last_ack_age_seconds", a) >= 0.0);
    assert!(s.value("nvmirror_source_uptime_seconds", a) > 0.0);
    assert_eq!(s.value("nvmirror_source_stopped", a), 0.0);
    assert_eq!(s.value("nvmirror_source_out_of_sync", a), 0.0);
    assert_eq!(
        s.value("nvmirror_source_sync_state", "state=\"in-sync\""),
        1.0,
        "{}",
        s.text
    );
    assert!(s.get("nvmirror_source_build_info", "version=\"").is_some());
    assert!(s
        .get(
            "nvmirror_source_partition_capacity_bytes",
            "partition=\"0\""
        )
        .is_some());
    assert_documented(&s, &doc);

    // The destination: after the cp every record is applied; its counters moved.
    let d = scrape(dst);
    assert!(
        d.value("nvmirror_dest_records_received_total", a) > 0.0,
        "{}",
        d.text
    );
    assert!(d.value("nvmirror_dest_bytes_received_total", a) >= 1_000_000.0);
    assert!(d.value("nvmirror_dest_cps_total", a) >= 1.0);
    assert!(d.value("nvmirror_dest_cp_duration_seconds_count", a) >= 1.0);
    assert!(d.value("nvmirror_dest_applied_seq", a) >= status.last_logged_seq as f64);
    assert_eq!(d.value("nvmirror_dest_backlog_records", a), 0.0);
    assert_eq!(d.value("nvmirror_dest_promoted", a), 0.0);
    assert_eq!(d.value("nvmirror_dest_out_of_sync", a), 0.0);
    assert!(d.get("nvmirror_dest_build_info", "version=\"").is_some());
    assert_documented(&d, &doc);

    // The same figures as fs-dest status.
    let ds = h.dest_source_status("alpha");
    let records = ds["records_received"].as_u64().expect("records_received") as f64;
    assert!(d.value("nvmirror_dest_records_received_total", a) <= records);

    // The source's endpoint refuses garbage too, and goes on serving.
    let answer = exchange(src, b"\x16\x03\x01 not http\r\n\r\n").expect("garbage exchange");
    assert_eq!(status_code(&answer), 400, "{answer}");
    assert_eq!(scrape(src).value("nvmirror_source_link_up", a), 1.0);
}

/// Metric names a PromQL expression reads: identifiers that are not functions, aggregation
/// operators, keywords or grouping labels, outside label matchers, strings and ranges.
fn metric_names(expr: &str) -> Vec<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Blank out label matchers, strings and range selectors.
    let mut cleaned = String::new();
    let (mut braces, mut brackets, mut quote) = (0, 0, None::<char>);
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{') => braces += 1,
            (None, '}') => braces -= 1,
            (None, '[') => brackets += 1,
            (None, ']') => brackets -= 1,
            (None, c) if braces == 0 && brackets == 0 => {
                cleaned.push(c);
                continue;
            }
            _ => {}
        }
        cleaned.push(' ');
    }
    let chars: Vec<char> = cleaned.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if !(c.is_ascii_alphabetic() || c == '_' || c == ':') {
            // Skip numbers whole (1e3, 0.99).
            if c.is_ascii_digit() || c == '.' {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            } else {
                i += 1;
            }
            continue;
        }
        let start = i;
        while i < chars.len()
            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
        {
            i += 1;
        }
        let ident: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        let call = chars.get(j) == Some(&'(');
        if GROUPING.contains(&ident.as_str()) {
            if call {
                // Skip the label list.
                while j < chars.len() && chars[j] != ')' {
                    j += 1;
                }
                i = j + 1;
            }
            continue;
        }
        if call || NOT_METRICS.contains(&ident.as_str()) {
            continue;
        }
        names.push(ident);
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets (rows' panels included) and
/// `label_values(...)` variables.
fn dashboard_exprs() -> Vec<(String, String)> {
    let path = repo().join("deploy/grafana/nvmirror.json");
    let text = fs::read_to_string(&path).expect("deploy/grafana/nvmirror.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard has a Prometheus data source variable"
    );
    let mut out = Vec::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .expect("a query variable's query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.split(',').next())
            .unwrap_or(q);
        out.push((format!("variable {}", v["name"]), inner.to_string()));
    }
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("panel {}", p["title"]), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dash["panels"], &mut out);
    out
}

#[test]
fn the_dashboard_is_documented_and_covers_lag_cps_link_and_throughput() {
    let exprs = dashboard_exprs();
    let doc = metrics_doc();
    let all: String = exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needed in [
        "nvmirror_source_lag_records",
        "rate(nvmirror_source_cps_total",
        "nvmirror_source_cp_duration_seconds_bucket",
        "nvmirror_source_link_up",
        "nvmirror_dest_link_up",
        "rate(nvmirror_source_bytes_mirrored_total",
    ] {
        assert!(all.contains(needed), "the dashboard shows {needed}");
    }
    for (panel, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{panel}: no metric in {expr:?}");
        for name in names {
            assert!(name.starts_with("nvmirror_"), "{panel}: {name} in {expr:?}");
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{base}`")),
                "{panel}: {name} is not documented in docs/operations.md (## Metrics)"
            );
        }
    }
    assert_eq!(
        metric_names("histogram_quantile(0.9, sum by (source, le) (rate(a_bucket{x=\"y\"}[5m]))) / on (source) group_left b"),
        vec!["a_bucket", "b"]
    );
}

#[test]
fn the_dashboard_queries_only_metrics_the_daemons_export() {
    const TEST: &str = "metrics_dashboard";
    require_mount!(TEST);
    let h = Harness::start(
        HarnessOptions::new(TEST)
            .source_args(["--metrics-listen", "127.0.0.1:0"])
            .dest_args(["--metrics-listen", "127.0.0.1:0"]),
    );
    let (src, dst) = endpoints(&h);
    // Figures that appear only once something happened: an acknowledgement, a CP.
    fs::write(h.mnt().join("f"), b"hello").expect("write");
    h.cp();
    let mut exported = scrape(src).names();
    exported.extend(scrape(dst).names());
    for (panel, expr) in dashboard_exprs() {
        for name in metric_names(&expr) {
            assert!(
                exported.contains(&name),
                "{panel}: {name} (in {expr:?}) is not exported by either daemon; exported: \
                 {exported:?}"
            );
        }
    }
}

#[test]
fn bad_requests_get_errors_and_the_endpoint_keeps_serving() {
    const TEST: &str = "metrics_bad_requests";
    // Only fs-dest: no mount needed.
    let h = Harness::start_dest_only(
        &HarnessOptions::new(TEST).dest_args(["--metrics-listen", "127.0.0.1:0"]),
    );
    let addr = metrics_addr(&h.log_dir.join("fs-dest.log"));
    scrape(addr);

    // A client that connects and says nothing does not block the others.
    let mut idle = TcpStream::connect_timeout(&addr, TIMEOUT).expect("idle connection");
    let half = TcpStream::connect_timeout(&addr, TIMEOUT).expect("half a request");
    (&half).write_all(b"GET /metr").expect("write half");
    let started = Instant::now();
    scrape(addr);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a scrape waited {:?} behind idle clients",
        started.elapsed()
    );

    let cases: [(&[u8], u16); 8] = [
        (b"\x00\xff\xfe garbage \x01\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"hello\n\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /../etc/passwd HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /metrics HTTP/1.1\r\n", 400), // the head never ends: the client closes
    ];
    for (request, code) in cases {
        let answer = if request.ends_with(b"\r\n\r\n") || request.ends_with(b"\n\n") {
            exchange(addr, request)
        } else {
            let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
            s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            s.write_all(request).expect("write");
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut a = String::new();
            s.read_to_string(&mut a).map(|_| a)
        }
        .unwrap_or_else(|e| panic!("{request:?}: {e}"));
        assert_eq!(status_code(&answer), code, "{request:?}: {answer}");
    }
    // An endless head is cut off at its limit (8 KiB) with a 400.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.resize(8193, b'a');
    let answer = exchange(addr, &huge).expect("oversized head");
    assert_eq!(status_code(&answer), 400, "{answer}");
    // HEAD: the headers without the body.
    let answer = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n").expect("HEAD");
    assert_eq!(status_code(&answer), 200, "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "HEAD has no body: {answer:?}");

    // Still serving; the idle client is closed at its deadline (10 s) without an answer.
    assert_eq!(scrape(addr).value("nvmirror_dest_sources", ""), 0.0);
    idle.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = Vec::new();
    let closed = idle.read_to_end(&mut buf);
    assert!(
        closed.is_ok() && buf.is_empty(),
        "the idle client: {closed:?}, got {buf:?}"
    );
    drop(half);
    let dest = h.dest.as_ref().expect("fs-dest");
    let log = fs::read_to_string(&dest.log).expect("log");
    assert!(!log.contains("panicked"), "fs-dest panicked:\n{log}");
}
