//! `/metrics` of a running node after real traffic: every SLI moves when its event happens, and
//! writing many distinct keys creates no new series (labels stay low-cardinality).

mod support;

use driftless_tls::TestPki;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(admin: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("application/openmetrics-text"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the first sample whose line starts with `prefix` (name and labels), if any.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Series identities (name + labels), without values.
fn series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sli_moves_with_real_traffic_and_keys_never_become_labels() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki")).unwrap();
    let rogue = TestPki::new(&dir.path().join("rogue")).unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let (cert, key) = pki.issue("hub").unwrap();
    let listen = format!(
        "[listen]\naddr = \"{hub_addr}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        cert.display(),
        key.display(),
        pki.ca_path().display()
    );
    let fast_checks = |cfg: String| cfg.replace("[sync]\n", "[sync]\ncheck_interval_ms = 200\n");
    let mut hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        fast_checks(config_text("hub", &listen, "")),
    )
    .await;
    let peer = |ca: &std::path::Path, client: (std::path::PathBuf, std::path::PathBuf)| {
        format!(
            "[[peers]]\nname = \"hub\"\naddr = \"{hub_addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            ca.display(),
            client.0.display(),
            client.1.display()
        )
    };
    let edge_ports = Ports::bind().await;
    let edge_addr = edge_ports.peer_addr();
    let edge_cfg = fast_checks(config_text(
        "edge",
        "",
        &peer(&pki.ca_path(), pki.issue("edge").unwrap()),
    ));
    let mut edge = TestNode::start(dir.path(), "edge", edge_ports, edge_cfg).await;
    let mut rogue_node = TestNode::start(
        dir.path(),
        "rogue",
        Ports::bind().await,
        config_text(
            "rogue",
            "",
            &peer(&pki.ca_path(), rogue.issue("rogue").unwrap()),
        ),
    )
    .await;

    edge.sql("INSERT INTO items VALUES (1, 'tea', 2.0, 10)");
    converge(&[&hub, &edge]).await;
    // the convergence check runs on idle links and finds the replicas equal
    eventually("a convergence check", async || {
        sample(
            &scrape(hub.admin).await,
            "driftless_convergence_ratio{peer=\"edge\",table=\"items\"}",
        ) == Some(1.0)
    })
    .await;
    // a conflict: both write the same cell while the link is down; the restart is a retry
    edge.stop().await.unwrap();
    edge.sql("UPDATE items SET name = 'green tea' WHERE id = 1");
    hub.sql("UPDATE items SET name = 'black tea' WHERE id = 1");
    edge.restart(edge_addr).await;
    converge(&[&hub, &edge]).await;
    // 10,000 distinct keys written: no new series anywhere
    let before = series(&scrape(hub.admin).await);
    let mut sql = String::from("BEGIN;");
    for i in 1_000..11_000 {
        sql.push_str(&format!(
            "INSERT INTO items (id, name, price, stock) VALUES ({i}, 'k{i}', 1.0, 1);"
        ));
    }
    sql.push_str("COMMIT;");
    edge.sql(&sql);
    eventually("the 10,000 rows to arrive", async || {
        hub.query_i64("SELECT count(*) FROM items") >= 10_001
    })
    .await;
    let after = series(&scrape(hub.admin).await);
    let new: Vec<_> = after.difference(&before).collect();
    assert!(new.is_empty(), "new series appeared: {new:?}");
    assert!(after.len() < 200, "{} series", after.len());

    // a dead letter: the edge gains a column the hub does not have
    edge.sql("ALTER TABLE items ADD COLUMN extra TEXT; UPDATE items SET extra = 'x' WHERE id = 1");

    let m = &scrape(hub.admin).await;
    type Check = Box<dyn Fn(&str) -> bool>;
    let checks: Vec<(&str, Check)> = vec![
        (
            "lag histogram",
            Box::new(|m| {
                sample(m, "driftless_replication_lag_seconds_count{peer=\"edge\"}").unwrap_or(0.0)
                    >= 1.0
            }),
        ),
        (
            "changes applied",
            Box::new(|m| {
                sample(m, "driftless_changes_applied_total{peer=\"edge\"}").unwrap_or(0.0) >= 1.0
            }),
        ),
        (
            "changes captured",
            Box::new(|m| {
                sample(m, "driftless_changes_captured_total{table=\"items\"}").unwrap_or(0.0) >= 1.0
            }),
        ),
        (
            "conflict",
            Box::new(|m| {
                sample(m, "driftless_conflicts_total{table=\"items\",rule=\"lww\"}").unwrap_or(0.0)
                    >= 1.0
            }),
        ),
        (
            "dead letter",
            Box::new(|m| {
                sample(
                    m,
                    "driftless_apply_errors_total{table=\"items\",reason=\"unknown_column\"}",
                )
                .unwrap_or(0.0)
                    >= 1.0
            }),
        ),
        (
            "refused certificate",
            Box::new(|m| {
                sample(m, "driftless_auth_failures_total{reason=\"tls\"}").unwrap_or(0.0) >= 1.0
            }),
        ),
        (
            "peer connected",
            Box::new(|m| sample(m, "driftless_peer_connected{peer=\"edge\"}") == Some(1.0)),
        ),
        (
            "reconciliation runs",
            Box::new(|m| {
                sample(
                    m,
                    "driftless_reconciliation_runs_total{trigger=\"scheduled\"}",
                )
                .unwrap_or(0.0)
                    >= 1.0
            }),
        ),
        (
            "backlog gauge",
            Box::new(|m| sample(m, "driftless_backlog_changes{peer=\"edge\"}").is_some()),
        ),
    ];
    let mut pending: Vec<&str> = Vec::new();
    for (what, check) in &checks {
        if !check(m) {
            pending.push(what);
        }
    }
    if !pending.is_empty() {
        // some move a moment later (dead letters, checks): wait, then insist
        eventually("every SLI to move", async || {
            let m = scrape(hub.admin).await;
            checks.iter().all(|(_, c)| c(&m))
        })
        .await;
    }
    // the refused node keeps retrying (and counts it), and the dead-letter gauge follows the table
    eventually("the refused node's retry counter", async || {
        sample(
            &scrape(rogue_node.admin).await,
            "driftless_retries_total{reason=\"reconnect\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    eventually("the dead-letter gauge", async || {
        sample(
            &scrape(hub.admin).await,
            "driftless_dead_letters{table=\"items\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;

    for node in [&mut rogue_node, &mut edge, &mut hub] {
        node.stop().await.unwrap();
    }
}
