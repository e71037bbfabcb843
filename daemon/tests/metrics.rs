//! The metrics endpoint of a real ferryd: /metrics parsed with a strict parser of the
//! OpenMetrics text format (what `prometheus-client` emits and Prometheus negotiates),
//! /healthz, /readyz, and bad requests that must not take the endpoint down.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use ferryd::testkit::{
    assert_qemu_io_ok, enable_metrics, primary_config, qemu_io, skip_without, Node,
};

const MIB: u64 = 1 << 20;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

// ---------------------------------------------------------------------------------
// A strict parser of the OpenMetrics text exposition format (the subset without
// exemplars and timestamps, which ferryd does not emit). Any deviation is an error.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Family {
    typ: String,
    help: Option<String>,
    unit: Option<String>,
    samples: Vec<Sample>,
}

fn valid_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value '{s}': {e}")),
    }
}

/// Parses `{a="x",b="y"}` starting at `s[0] == '{'`; returns labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = &s[1..];
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((labels, r));
    }
    loop {
        let eq = rest.find('=').ok_or("label without '='")?;
        let key = &rest[..eq];
        if !valid_name(key) {
            return Err(format!("bad label name '{key}'"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("newline in label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("duplicate label '{key}'"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        rest = rest.strip_prefix(',').ok_or("expected ',' or '}'")?;
    }
}

/// Sample-name suffixes each metric type allows.
fn suffixes(typ: &str) -> &'static [&'static str] {
    match typ {
        "counter" => &["_total", "_created"],
        "gauge" | "unknown" => &[""],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "info" => &["_info"],
        "stateset" => &[""],
        "summary" => &["", "_count", "_sum", "_created"],
        _ => &[],
    }
}

fn parse_openmetrics(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("exposition does not end with '# EOF'")?;
    for (n, line) in body.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if let Some(meta) = line.strip_prefix("# ") {
            let mut it = meta.splitn(3, ' ');
            let (kind, name, arg) = (it.next().unwrap_or(""), it.next(), it.next());
            let name = name.ok_or_else(|| err("metadata without a name".into()))?;
            if !valid_name(name) {
                return Err(err("bad metric name".into()));
            }
            let fam = match &current {
                Some(c) if c == name => families.get_mut(name).expect("current family"),
                _ => {
                    if families.contains_key(name) {
                        return Err(err("family is not contiguous".into()));
                    }
                    current = Some(name.to_string());
                    families.entry(name.to_string()).or_default()
                }
            };
            let arg = arg.ok_or_else(|| err("metadata without a value".into()))?;
            match kind {
                "HELP" => fam.help = Some(arg.to_string()),
                "TYPE" => {
                    if suffixes(arg).is_empty() {
                        return Err(err(format!("unknown type '{arg}'")));
                    }
                    fam.typ = arg.to_string();
                }
                "UNIT" => {
                    if !name.ends_with(&format!("_{arg}")) {
                        return Err(err("family name does not end with its unit".into()));
                    }
                    fam.unit = Some(arg.to_string());
                }
                _ => return Err(err(format!("unknown metadata '{kind}'"))),
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(err("unexpected comment or blank line".into()));
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("expected one space before the value".into()))?;
        if value.contains(' ') {
            return Err(err("timestamps/exemplars are not expected".into()));
        }
        let value = parse_value(value).map_err(err)?;
        let fam_name = current
            .as_ref()
            .ok_or_else(|| err("sample before any TYPE".into()))?;
        let fam = families.get_mut(fam_name).expect("current family");
        let ok = suffixes(&fam.typ)
            .iter()
            .any(|s| name.strip_suffix(s) == Some(fam_name.as_str()));
        if !ok {
            return Err(err(format!(
                "sample name does not belong to the {} family {fam_name}",
                fam.typ
            )));
        }
        fam.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for (name, f) in &families {
        if f.typ.is_empty() {
            return Err(format!("family {name} has no TYPE"));
        }
    }
    Ok(families)
}

// ---------------------------------------------------------------------------------

struct Http {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends raw bytes, reads until the server closes, parses the response.
fn http_raw(addr: SocketAddr, request: &[u8]) -> Http {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).expect("send request");
    // Half-close: a truncated request then ends in EOF rather than the read timeout.
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read response");
    let text = String::from_utf8(out).expect("UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().expect("status code");
    let headers: BTreeMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("header line");
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    assert_eq!(
        headers.get("content-length").map(String::as_str),
        Some(body.len().to_string().as_str()),
        "Content-Length must match the body"
    );
    assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
    Http {
        status,
        headers,
        body: body.to_string(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Http {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: ferry-test\r\n\r\n").as_bytes(),
    )
}

fn scrape(addr: SocketAddr) -> BTreeMap<String, Family> {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.headers["content-type"].starts_with("application/openmetrics-text"),
        "{:?}",
        r.headers
    );
    parse_openmetrics(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
}

fn family<'a>(m: &'a BTreeMap<String, Family>, name: &str, typ: &str) -> &'a Family {
    let f = m
        .get(name)
        .unwrap_or_else(|| panic!("no family {name}; have {:?}", m.keys().collect::<Vec<_>>()));
    assert_eq!(f.typ, typ, "type of {name}");
    assert!(f.help.is_some(), "{name} has no HELP");
    f
}

/// The value of the one sample named `sample` whose labels include `labels`.
fn value(m: &BTreeMap<String, Family>, fam: &str, sample: &str, labels: &[(&str, &str)]) -> f64 {
    let f = &m[fam];
    let hits: Vec<&Sample> = f
        .samples
        .iter()
        .filter(|s| {
            s.name == sample
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(hits.len(), 1, "{sample}{labels:?} in {:?}", f.samples);
    hits[0].value
}

fn check_histogram(m: &BTreeMap<String, Family>, name: &str) -> f64 {
    let f = family(m, name, "histogram");
    assert_eq!(f.unit.as_deref(), Some("seconds"));
    let buckets: Vec<(f64, f64)> = f
        .samples
        .iter()
        .filter(|s| s.name == format!("{name}_bucket"))
        .map(|s| (parse_value(&s.labels["le"]).unwrap(), s.value))
        .collect();
    let les: Vec<f64> = buckets.iter().map(|b| b.0).collect();
    let mut expected = ferryd::primary::frontend::LATENCY_BUCKETS.to_vec();
    expected.push(f64::INFINITY);
    assert_eq!(les, expected, "{name} buckets");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name}: buckets not cumulative: {buckets:?}"
    );
    let count = value(m, name, &format!("{name}_count"), &[]);
    assert_eq!(
        buckets.last().unwrap().1,
        count,
        "{name}: +Inf bucket != count"
    );
    assert!(value(m, name, &format!("{name}_sum"), &[]) >= 0.0);
    count
}

#[test]
fn parser_rejects_malformed_expositions() {
    let good = "# HELP a x\n# TYPE a counter\na_total{op=\"w\"} 1\n# EOF\n";
    assert!(parse_openmetrics(good).is_ok());
    for bad in [
        "# TYPE a counter\na_total 1\n",                         // no EOF
        "# TYPE a counter\na 1\n# EOF\n",                        // counter sample without _total
        "# TYPE a gauge\na{x=\"1} 1\n# EOF\n",                   // unterminated label
        "# TYPE a gauge\na  1\n# EOF\n",                         // two spaces
        "a 1\n# EOF\n",                                          // no TYPE
        "# TYPE a gauge\na one\n# EOF\n",                        // bad value
        "# TYPE a_bytes gauge\n# UNIT a_bytes seconds\n# EOF\n", // unit mismatch
    ] {
        assert!(parse_openmetrics(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_endpoint_serves_a_primary() {
    if skip_without("qemu-io", "metrics_endpoint_serves_a_primary") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let journal_size = 64 * MIB;
    let cfg = primary_config(dir.path(), &[("vol0", 64 * MIB)], journal_size, 4 * MIB);
    enable_metrics(&cfg);
    let mut node = Node::start(ferryd(), &cfg);
    let addr = node
        .metrics
        .expect("the ready line carries metrics=ADDR when [metrics] is configured");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let h = get(addr, "/healthz");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(get(addr, "/readyz").status, 200);

    // Before any client IO: the op series exist at zero.
    let m = scrape(addr);
    family(&m, "ferry_frontend_ops", "counter");
    let writes_before = value(
        &m,
        "ferry_frontend_ops",
        "ferry_frontend_ops_total",
        &[("op", "write")],
    );
    assert_eq!(writes_before, 0.0);

    let cmds: Vec<String> = [
        "write -P 0xab 0 1M",
        "write -P 0x11 1M 64k",
        "flush",
        "read -P 0xab 0 64k",
        "discard 2M 64k",
        "write -z 4M 128k",
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_qemu_io_ok(&qemu_io(&node.url("vol0"), &cmds));

    let m = scrape(addr);
    // Node.
    assert_eq!(value(&m, "ferry_node_ready", "ferry_node_ready", &[]), 1.0);
    family(&m, "ferry_node_role", "info");
    assert_eq!(
        value(
            &m,
            "ferry_node_role",
            "ferry_node_role_info",
            &[("role", "primary"), ("node", "primary")]
        ),
        1.0
    );
    family(&m, "ferry_node_epoch", "gauge");

    // Frontend.
    let ops = |op| {
        value(
            &m,
            "ferry_frontend_ops",
            "ferry_frontend_ops_total",
            &[("op", op)],
        )
    };
    assert!(ops("write") >= 2.0, "write ops {}", ops("write"));
    assert!(ops("flush") >= 1.0);
    assert!(ops("read") >= 1.0);
    assert!(ops("trim") >= 1.0);
    assert!(ops("write_zeroes") >= 1.0);
    let f = family(&m, "ferry_frontend_bytes", "counter");
    assert_eq!(f.unit.as_deref(), Some("bytes"));
    let written = value(
        &m,
        "ferry_frontend_bytes",
        "ferry_frontend_bytes_total",
        &[("op", "write")],
    );
    assert!(written >= (MIB + 64 * 1024) as f64, "written {written}");
    family(&m, "ferry_frontend_errors", "counter");
    assert_eq!(
        value(
            &m,
            "ferry_frontend_errors",
            "ferry_frontend_errors_total",
            &[("op", "write")]
        ),
        0.0
    );
    assert!(check_histogram(&m, "ferry_frontend_write_seconds") >= ops("write"));
    assert!(check_histogram(&m, "ferry_frontend_flush_seconds") >= 1.0);

    // Journal.
    family(&m, "ferry_journal_capacity_bytes", "gauge");
    assert_eq!(
        value(
            &m,
            "ferry_journal_capacity_bytes",
            "ferry_journal_capacity_bytes",
            &[]
        ),
        journal_size as f64
    );
    family(&m, "ferry_journal_used_bytes", "gauge");
    let used = value(
        &m,
        "ferry_journal_used_bytes",
        "ferry_journal_used_bytes",
        &[],
    );
    assert!((0.0..=journal_size as f64).contains(&used), "used {used}");
    for c in ["ferry_journal_batches", "ferry_journal_records"] {
        family(&m, c, "counter");
        assert!(value(&m, c, &format!("{c}_total"), &[]) > 0.0, "{c}");
    }
    family(&m, "ferry_journal_written_bytes", "counter");
    assert!(
        value(
            &m,
            "ferry_journal_written_bytes",
            "ferry_journal_written_bytes_total",
            &[]
        ) >= written
    );
    family(&m, "ferry_journal_engine", "info");
    let engine = &m["ferry_journal_engine"].samples[0];
    assert_eq!(engine.name, "ferry_journal_engine_info");
    assert!(!engine.labels["engine"].is_empty(), "{engine:?}");
    assert!(engine.labels.contains_key("fallback_reason"), "{engine:?}");
    let durable = value(
        &m,
        "ferry_journal_durable_seq",
        "ferry_journal_durable_seq",
        &[],
    );
    assert!(durable >= 5.0, "durable {durable}");

    // Apply position: every acknowledged write is applied.
    let applied = value(
        &m,
        "ferry_apply_applied_seq",
        "ferry_apply_applied_seq",
        &[],
    );
    assert!(applied > 0.0);
    family(&m, "ferry_apply_lag_records", "gauge");
    assert_eq!(
        value(&m, "ferry_apply_failed", "ferry_apply_failed", &[]),
        0.0
    );
    // No targets configured: no per-target series.
    assert!(m["ferry_node_ready"].samples.len() == 1);
    assert!(!m.contains_key("ferry_replication_lag_seconds"));

    // Bad requests get an error status and the endpoint keeps serving.
    assert_eq!(get(addr, "/nope").status, 404);
    assert_eq!(get(addr, "/metrics/../etc/passwd").status, 404);
    assert_eq!(
        http_raw(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").status,
        405
    );
    assert_eq!(http_raw(addr, b"BOGUS\r\n\r\n").status, 400);
    assert_eq!(
        http_raw(
            addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
        )
        .status,
        400
    );
    assert_eq!(http_raw(addr, b"GET /metrics HTTP/1.1\r\n").status, 400); // truncated, then EOF
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 64 * 1024));
    assert_eq!(http_raw(addr, &huge).status, 431);
    drop(TcpStream::connect(addr).unwrap()); // connect and close without a byte
    {
        // A half-open client must not block others.
        let _idle = TcpStream::connect(addr).unwrap();
        assert_eq!(get(addr, "/healthz").status, 200);
    }
    assert_eq!(get(addr, "/healthz").status, 200);
    let m2 = scrape(addr);
    assert!(
        value(
            &m2,
            "ferry_frontend_ops",
            "ferry_frontend_ops_total",
            &[("op", "write")]
        ) >= ops("write")
    );

    // Every series the Grafana dashboard queries exists (replication series need
    // targets; the unit tests in metrics.rs cover those names).
    let samples: std::collections::BTreeSet<&str> = m
        .values()
        .flat_map(|f| f.samples.iter().map(|s| s.name.as_str()))
        .collect();
    let dash = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/grafana-dashboard.json"),
    )
    .expect("systemd/grafana-dashboard.json");
    serde_json::from_str::<serde_json::Value>(&dash).expect("dashboard is JSON");
    let replication = [
        "ferry_replication_lag_seconds",
        "ferry_replication_lag_bytes",
        "ferry_replication_acked_seq",
        "ferry_replication_applied_seq",
        "ferry_replication_target_state",
        "ferry_replication_target_mode",
    ];
    let mut rest = dash.as_str();
    let mut queried = 0;
    while let Some(i) = rest.find("ferry_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        rest = &tail[end..];
        if name == "ferry_" || name.starts_with("ferry_overview") {
            continue;
        }
        let name = name.strip_suffix("_bucket").map_or(name, |n| n);
        let known = samples.contains(name)
            || samples.contains(format!("{name}_bucket").as_str())
            || replication.contains(&name);
        assert!(
            known,
            "the dashboard queries {name}, which ferryd does not export"
        );
        queried += 1;
    }
    assert!(queried > 10);

    let st = node.terminate();
    assert!(st.success(), "ferryd exit: {st:?}\n{}", node.log_text());
    assert!(
        node.log_text().contains(&format!("http://{addr}/metrics")),
        "the bound metrics address is logged"
    );
}

#[test]
fn no_metrics_section_means_no_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 16 * MIB)], 16 * MIB, 4 * MIB);
    let node = Node::start(ferryd(), &cfg);
    assert!(node.nbd.is_some());
    assert_eq!(node.metrics, None);
}
