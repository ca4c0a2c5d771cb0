//! The shipped operations kit — `deploy/prometheus/alerts.yml` (with its unit tests in
//! `alerts_test.yml`), `deploy/grafana/driftless.json` and `docs/runbooks/` — checked against the
//! metrics a node exports: every metric the rules and the dashboard name exists, every alert has
//! a severity, a summary, a description and a runbook that exists and is linked, and the rules
//! pass `promtool check rules` and `promtool test rules`.
//!
//! promtool comes from Debian's `prometheus` package. When it is missing the promtool test is
//! skipped with a message, except under CI (`CI` set), where a missing promtool fails it.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

/// Every metric a running node exports, read from its `/metrics` after traffic (the `# TYPE`
/// lines give each family's name and type): `(series names, histogram base names)`. Counters are
/// exported as `<name>_total`; histograms as `_bucket`, `_sum` and `_count` series.
fn exported() -> &'static (BTreeSet<String>, BTreeSet<String>) {
    static EXPORTED: std::sync::OnceLock<(BTreeSet<String>, BTreeSet<String>)> =
        std::sync::OnceLock::new();
    EXPORTED.get_or_init(|| {
        let text = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(scrape_live_node());
        let mut names = BTreeSet::new();
        let mut histograms = BTreeSet::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    names.insert(name.to_owned());
                    histograms.insert(name.to_owned());
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        }
        (names, histograms)
    })
}

/// Runs a hub and an edge in this process, makes some traffic and a convergence check, and
/// returns the hub's `/metrics`.
async fn scrape_live_node() -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let fast = |cfg: String| cfg.replace("[sync]\n", "[sync]\ncheck_interval_ms = 200\n");
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let mut hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        fast(config_text(
            "hub",
            &insecure_listen_at(hub_addr),
            &insecure_peer("edge", "127.0.0.1:9".parse().unwrap()),
        )),
    )
    .await;
    let mut edge = TestNode::start(
        dir.path(),
        "edge",
        Ports::bind().await,
        fast(config_text("edge", "", &insecure_peer("hub", hub_addr))),
    )
    .await;
    edge.sql("INSERT INTO items VALUES (1, 'a', 1.0, 1)");
    converge(&[&hub, &edge]).await;
    let admin = hub.admin;
    let metrics = async move || {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("response");
        body
    };
    eventually("a convergence check on the hub", async || {
        metrics().await.contains("driftless_convergence_ratio{")
    })
    .await;
    let text = metrics().await;
    edge.stop().await.expect("edge stops");
    hub.stop().await.expect("hub stops");
    text
}

fn insecure_listen_at(addr: std::net::SocketAddr) -> String {
    format!("[listen]\naddr = \"{addr}\"\ninsecure = true")
}

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";
const DASHBOARD: &str = "deploy/grafana/driftless.json";
const RUNBOOKS: &str = "docs/runbooks";
const RUNBOOK_URL_PREFIX: &str = "https://github.com/driftless/driftless/blob/main/";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every match of the regex `driftless_[a-z_]+` in `text`, left to right, without overlaps.
fn metric_names(text: &str) -> Vec<String> {
    const PREFIX: &str = "driftless_";
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(PREFIX) {
        let after = &rest[start + PREFIX.len()..];
        let len = after
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
            .count();
        if len == 0 {
            rest = after;
            continue;
        }
        names.push(format!("{PREFIX}{}", &after[..len]));
        rest = &after[len..];
    }
    names
}

/// Names of recording rules (`driftless:...`) used in `text`.
fn recorded_names(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "driftless:";
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find(PREFIX) {
        let after = &rest[start + PREFIX.len()..];
        let len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b':')
            .count();
        names.insert(format!("{PREFIX}{}", &after[..len]));
        rest = &after[len..];
    }
    names
}

/// The exported metric a series name belongs to: itself, or the histogram whose `_bucket`,
/// `_sum` or `_count` series it is.
fn exported_metric(name: &str) -> Option<&'static str> {
    let (names, histograms) = exported();
    if let Some(known) = names.get(name) {
        return Some(known.as_str());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        histograms.get(base).map(String::as_str)
    })
}

/// One `- alert:` rule of alerts.yml, read line by line (the file keeps one key per line).
#[derive(Debug, Default)]
struct Alert {
    name: String,
    severity: Option<String>,
    summary: Option<String>,
    description: Option<String>,
    runbook_url: Option<String>,
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(value)
        .to_owned()
}

fn alerts(text: &str) -> Vec<Alert> {
    let mut alerts: Vec<Alert> = Vec::new();
    let mut in_alert = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts.push(Alert {
                name: unquote(name),
                ..Alert::default()
            });
            in_alert = true;
        } else if line.starts_with("- record:") || line.starts_with("- name:") {
            in_alert = false;
        } else if in_alert {
            let alert = alerts.last_mut().expect("inside an alert");
            for (key, slot) in [
                ("severity:", &mut alert.severity),
                ("summary:", &mut alert.summary),
                ("description:", &mut alert.description),
                ("runbook_url:", &mut alert.runbook_url),
            ] {
                if let Some(value) = line.strip_prefix(key) {
                    *slot = Some(unquote(value));
                }
            }
        }
    }
    alerts
}

/// `DriftlessLagBudgetBurnFast` -> `driftless-lag-budget-burn-fast`.
fn kebab(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is valid JSON")
}

/// Every string value anywhere in `value`.
fn strings<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Every panel, rows and the panels nested in collapsed rows included.
fn panels(value: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in value["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panels(panel));
    }
    out
}

/// The PromQL expression of every panel query.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn rules_and_dashboard_name_only_exported_metrics() {
    let rules = read(ALERTS);
    let dashboard = dashboard();
    let mut dashboard_text = Vec::new();
    strings(&dashboard, &mut dashboard_text);

    let mut unknown = BTreeSet::new();
    let mut used_by_dashboard = BTreeSet::new();
    let mut used_by_rules = BTreeSet::new();
    for (source, text, used) in [
        (ALERTS, rules.as_str(), &mut used_by_rules),
        (
            DASHBOARD,
            &dashboard_text.join("\n"),
            &mut used_by_dashboard,
        ),
    ] {
        for name in metric_names(text) {
            match exported_metric(&name) {
                Some(metric) => {
                    used.insert(metric);
                }
                None => {
                    unknown.insert(format!("{source}: {name}"));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics a node does not export: {unknown:#?}"
    );

    // recording rules used anywhere are defined in alerts.yml
    let defined: BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record:").map(unquote))
        .collect();
    assert!(
        !defined.is_empty(),
        "alerts.yml defines the SLO recording rules"
    );
    for (source, text) in [
        (ALERTS, rules.clone()),
        (DASHBOARD, dashboard_text.join("\n")),
    ] {
        let undefined: Vec<String> = recorded_names(&text)
            .difference(&defined)
            .cloned()
            .collect();
        assert!(
            undefined.is_empty(),
            "{source} uses recording rules alerts.yml does not define: {undefined:?}"
        );
    }

    // the SLO metrics are alerted on, and the dashboard shows every exported metric
    for metric in [
        "driftless_replication_lag_seconds",
        "driftless_apply_errors_total",
        "driftless_changes_applied_total",
        "driftless_convergence_ratio",
        "driftless_drift_incidents_total",
        "driftless_auth_failures_total",
    ] {
        assert!(used_by_rules.contains(metric), "no alert on {metric}");
    }
    let missing: Vec<&String> = exported()
        .0
        .iter()
        .filter(|m| !used_by_dashboard.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics with no dashboard panel: {missing:?}"
    );
}

#[test]
fn every_alert_has_a_severity_a_linked_runbook_and_a_unit_test() {
    let alerts = alerts(&read(ALERTS));
    assert!(alerts.len() >= 10, "alerts found: {alerts:#?}");
    let tests = read(ALERTS_TEST);
    let index = read(&format!("{RUNBOOKS}/README.md"));

    let mut names = BTreeSet::new();
    let mut runbooks = BTreeSet::new();
    for alert in &alerts {
        let name = &alert.name;
        assert!(names.insert(name.clone()), "alert {name} is defined twice");
        assert!(
            matches!(alert.severity.as_deref(), Some("page" | "ticket")),
            "{name}: severity must be page or ticket, is {:?}",
            alert.severity
        );
        for (what, value) in [
            ("summary", &alert.summary),
            ("description", &alert.description),
        ] {
            assert!(
                value.as_deref().is_some_and(|v| !v.is_empty()),
                "{name}: no {what} annotation"
            );
        }

        let file = format!("{}.md", kebab(name));
        let relative = format!("{RUNBOOKS}/{file}");
        assert_eq!(
            alert.runbook_url.as_deref(),
            Some(format!("{RUNBOOK_URL_PREFIX}{relative}").as_str()),
            "{name}: runbook_url"
        );
        let runbook = read(&relative);
        assert_eq!(
            runbook.lines().next(),
            Some(format!("# {name}").as_str()),
            "{relative} starts with the alert's name"
        );
        let severity = alert.severity.as_deref().unwrap_or_default();
        assert!(
            runbook.contains(&format!("**Severity:** {severity}")),
            "{relative} states severity {severity}"
        );
        for section in [
            "## What it means",
            "## Impact",
            "## Diagnose",
            "## Mitigate",
            "## Escalate",
        ] {
            assert!(runbook.contains(section), "{relative} has no {section:?}");
        }
        assert!(
            index.contains(&format!("]({file})")),
            "{RUNBOOKS}/README.md does not link {file}"
        );
        runbooks.insert(file);

        // a firing case (the only place the exact runbook_url appears in the tests)
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{ALERTS_TEST} has no case for {name}"
        );
        assert!(
            tests.contains(alert.runbook_url.as_deref().unwrap_or_default()),
            "{ALERTS_TEST} has no case where {name} fires"
        );
    }

    // no runbook without an alert, and links between runbooks resolve
    for entry in std::fs::read_dir(root().join(RUNBOOKS)).expect("docs/runbooks exists") {
        let path = entry.expect("a directory entry").path();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default()
            .to_owned();
        if file == "README.md" {
            continue;
        }
        assert!(
            runbooks.contains(&file),
            "{RUNBOOKS}/{file} belongs to no alert"
        );
        let text = std::fs::read_to_string(&path).expect("a readable runbook");
        for link in text.split("](").skip(1) {
            let target = link.split([')', '#']).next().unwrap_or_default();
            if target.ends_with(".md") && !target.contains('/') {
                assert!(
                    root().join(RUNBOOKS).join(target).is_file(),
                    "{RUNBOOKS}/{file} links the missing {target}"
                );
            }
        }
    }
}

#[test]
fn dashboard_has_the_three_views_and_the_variables() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for wanted in ["DS_PROMETHEUS", "peer", "table"] {
        assert!(
            variables.contains(&wanted),
            "no ${wanted} variable: {variables:?}"
        );
    }
    let all = panels(&dashboard);
    let rows: Vec<&str> = all
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for view in ["Executive", "On-call", "Debug"] {
        assert!(
            rows.iter().any(|r| r.starts_with(view)),
            "no {view} row: {rows:?}"
        );
    }
    let mut ids = BTreeSet::new();
    for panel in &all {
        assert!(
            ids.insert(panel["id"].as_u64()),
            "duplicate panel id {}",
            panel["id"]
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "${DS_PROMETHEUS}",
                "panel {:?} queries another data source",
                panel["title"]
            );
        }
    }
    assert!(dashboard_exprs(&dashboard).len() >= 20);
}

/// `Some(promtool)` if it can run; `None` (skip) if it is missing outside CI; panics under CI.
fn promtool() -> Option<&'static str> {
    match Command::new("promtool").arg("--version").output() {
        Ok(out) if out.status.success() => Some("promtool"),
        outcome => {
            let why = match outcome {
                Ok(out) => format!(
                    "promtool --version failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => format!("promtool not found: {e}"),
            };
            if std::env::var_os("CI").is_some() {
                panic!("{why}; CI needs it (Debian: apt-get install -y prometheus)");
            }
            eprintln!(
                "skipping the promtool checks: {why} (Debian: apt-get install -y prometheus)"
            );
            None
        }
    }
}

fn run(promtool: &str, args: &[&str], dir: &Path) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("promtool {}:\n{text}", args.join(" "));
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let root = root();
    run(promtool, &["check", "rules", ALERTS], &root);
    run(promtool, &["test", "rules", ALERTS_TEST], &root);

    // The dashboard's queries parse: each becomes a recording rule, with Grafana's variables
    // replaced by values of the right kind.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs(&dashboard()).iter().enumerate() {
        let mut expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        for variable in ["instance", "peer", "table"] {
            expr = expr
                .replace(&format!("${{{variable}}}"), ".*")
                .replace(&format!("${variable}"), ".*");
        }
        assert!(!expr.contains('$'), "unknown Grafana variable in {expr}");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("a JSON string is a YAML string")
        ));
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("dashboard.yml"), rules).expect("written");
    run(promtool, &["check", "rules", "dashboard.yml"], dir.path());
}

/// The text a node's registry renders after one lag observation.
fn rendered_lag() -> String {
    let metrics = driftless_node::telemetry::Metrics::new();
    metrics.lag.get_or_create(&metrics.peer("p")).observe(1.0);
    metrics.render()
}

/// The lag SLO (99% of changes applied within 5 s) is computed from the `le="5"` bucket
/// (alerts.yml accepts `5` and `5.0`): without a bucket boundary at exactly 5 s the burn-rate
/// alerts and the dashboard's SLO panel have no data.
#[test]
fn lag_histogram_has_a_bucket_boundary_at_the_5_s_objective() {
    let text = rendered_lag();
    let buckets: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("driftless_replication_lag_seconds_bucket{"))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        buckets.iter().any(|le| *le == "5" || *le == "5.0"),
        "the lag histogram needs a bucket boundary at 5 s (the SLO threshold); its buckets: {buckets:?}"
    );
}

#[test]
fn metric_names_follow_the_regex() {
    assert_eq!(
        metric_names(
            r#"sum(rate(driftless_apply_errors_total{a="b"}[5m])) / driftless_x9 driftless_"#
        ),
        ["driftless_apply_errors_total", "driftless_x"]
    );
    assert_eq!(
        exported_metric("driftless_replication_lag_seconds_bucket"),
        Some("driftless_replication_lag_seconds")
    );
    assert_eq!(
        exported_metric("driftless_changes_applied_total_count"),
        None
    );
    assert_eq!(
        kebab("DriftlessLagBudgetBurnFast"),
        "driftless-lag-budget-burn-fast"
    );
}
