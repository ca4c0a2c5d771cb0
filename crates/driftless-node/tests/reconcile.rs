//! Reconciliation between two running nodes: agreement is reported as such, rows changed behind
//! driftless's back (capture disabled, a row deleted by hand, a restored backup) are found and
//! repaired on both sides, and a repair never overwrites a newer write.

mod support;

use driftless_node::ops::{request_reconcile, request_reconcile_with};
use driftless_node::reconcile::ReconcileOptions;
use support::*;

fn manual_only(cfg: String) -> String {
    cfg.replace(
        "[sync]\n",
        "[sync]\nreconcile_interval_ms = 0\ncheck_interval_ms = 3600000\n",
    )
}

struct Pair {
    hub: TestNode,
    edge: TestNode,
    edge_addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        manual_only(config_text("hub", &insecure_listen_at(hub_addr), "")),
    )
    .await;
    let edge_ports = Ports::bind().await;
    let edge_addr = edge_ports.peer_addr();
    let edge = TestNode::start(
        dir.path(),
        "edge",
        edge_ports,
        manual_only(config_text("edge", "", &insecure_peer("hub", hub_addr))),
    )
    .await;
    let mut sql = String::from("BEGIN;");
    for i in 1..=200 {
        sql.push_str(&format!(
            "INSERT INTO items VALUES ({i}, 'item {i}', {i}.5, 10);"
        ));
    }
    sql.push_str("COMMIT;");
    hub.sql(&sql);
    converge(&[&hub, &edge]).await;
    eventually("the link", async || {
        edge.status().await.peers.iter().any(|p| p.connected)
    })
    .await;
    Pair {
        hub,
        edge,
        edge_addr,
        _dir: dir,
    }
}

fn insecure_listen_at(addr: std::net::SocketAddr) -> String {
    format!("[listen]\naddr = \"{addr}\"\ninsecure = true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_replicas_are_reported_in_agreement_in_one_round_trip() {
    let mut p = pair().await;
    let report = request_reconcile(p.edge.admin, "hub", None, false)
        .await
        .unwrap();
    assert!(!report.found_differences(), "{report:?}");
    assert_eq!(report.round_trips, 1);
    // nothing runs now: no progress to show
    assert_eq!(
        driftless_node::ops::fetch_reconcile_progress(p.edge.admin)
            .await
            .unwrap(),
        None
    );
    assert_eq!(report.tables[0].ranges_differing, 0);
    assert!(
        report.bytes_sent + report.bytes_received < 64 * 1024,
        "{report:?}"
    );
    let missing = request_reconcile(p.edge.admin, "nobody", None, false)
        .await
        .unwrap_err();
    assert!(
        missing.contains("not connected to peer nobody"),
        "{missing}"
    );
    p.edge.stop().await.unwrap();
    p.hub.stop().await.unwrap();
}

fn local(repair: bool) -> ReconcileOptions {
    ReconcileOptions {
        repair,
        local_check: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_changed_behind_drifless_back_are_found_and_repaired_on_both_sides() {
    let mut p = pair().await;
    // capture disabled on the edge (triggers dropped), then an edit, a delete and an insert; in
    // one transaction, because the node reinstalls dropped triggers as soon as it sees DDL
    p.edge.sql(
        "BEGIN; DROP TRIGGER _driftless_upd_items; DROP TRIGGER _driftless_del_items; DROP TRIGGER _driftless_ins_items;
         UPDATE items SET name = 'edited behind its back' WHERE id = 1;
         DELETE FROM items WHERE id = 2;
         INSERT INTO items VALUES (999, 'never captured', 1.0, 1); COMMIT;",
    );
    // and on the hub, a row deleted by hand with capture disabled
    p.hub
        .sql("BEGIN; DROP TRIGGER _driftless_del_items; DELETE FROM items WHERE id = 3; COMMIT;");
    // the merge states still agree: only the local check (reading the tables) can see this
    let states_only = request_reconcile(p.edge.admin, "hub", None, false)
        .await
        .unwrap();
    assert!(!states_only.found_differences(), "{states_only:?}");
    assert!(!states_only.local_check);

    let diff = request_reconcile_with(p.edge.admin, "hub", None, local(false))
        .await
        .unwrap();
    assert!(diff.found_differences(), "{diff:?}");
    let t = &diff.tables[0];
    assert_eq!((t.local_restored, t.local_adopted), (2, 1), "{diff:?}");
    assert_eq!((t.peer_restored, t.peer_adopted), (1, 0), "{diff:?}");
    assert_eq!(t.local_checked_rows, 201, "{diff:?}");
    assert_eq!(t.peer_checked_rows, 200, "{diff:?}");
    // diff changes nothing, on either side
    assert_eq!(
        p.edge.query_i64("SELECT count(*) FROM items WHERE id = 2"),
        0
    );
    assert_eq!(
        p.hub.query_i64("SELECT count(*) FROM items WHERE id = 3"),
        0
    );

    let fixed = request_reconcile_with(p.edge.admin, "hub", None, local(true))
        .await
        .unwrap();
    assert!(fixed.found_differences());
    // storage format 2 keeps no copy of lww values to restore from: the uncaptured writes are
    // adopted, captured as local writes of the side that made them, and replicated
    converge(&[&p.hub, &p.edge]).await;
    for node in [&p.hub, &p.edge] {
        assert_eq!(
            node.query_i64(
                "SELECT count(*) FROM items WHERE id = 1 AND name = 'edited behind its back'"
            ),
            1
        );
        assert_eq!(node.query_i64("SELECT count(*) FROM items WHERE id = 2"), 0);
        assert_eq!(node.query_i64("SELECT count(*) FROM items WHERE id = 3"), 0);
        assert_eq!(
            node.query_i64("SELECT count(*) FROM items WHERE id = 999"),
            1
        );
    }
    for node in [&p.hub, &p.edge] {
        let metrics = node.metrics().await;
        assert!(
            metrics.contains("driftless_drift_incidents_total{table=\"items\"}"),
            "{metrics}"
        );
    }
    // and now they agree, tables included
    let again = request_reconcile_with(p.edge.admin, "hub", None, local(false))
        .await
        .unwrap();
    assert!(!again.found_differences(), "{again:?}");
    p.edge.stop().await.unwrap();
    p.hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_local_check_adopts_rows_written_behind_drifless_back() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::bind().await;
    let cfg = config_text("solo", "", "").replace(
        "[sync]\n",
        "[sync]\nreconcile_interval_ms = 0\nlocal_check_interval_ms = 500\n",
    );
    let mut node = TestNode::start(dir.path(), "solo", ports, cfg).await;
    node.sql(
        "INSERT INTO items VALUES (1, 'one', 1.0, 1); INSERT INTO items VALUES (2, 'two', 2.0, 2);",
    );
    eventually("the inserts to be captured", async || {
        node.status().await.changes_captured >= 2
    })
    .await;
    node.sql(
        "BEGIN; DROP TRIGGER _driftless_upd_items; UPDATE items SET name = 'by hand' WHERE id = 1; COMMIT;",
    );
    // the edit stays, and is captured as a local write: row 1 moves to the log's head
    eventually("the local check to adopt row 1", async || {
        node.metrics()
            .await
            .contains("driftless_drift_incidents_total{table=\"items\"} 1")
    })
    .await;
    assert_eq!(
        node.query_i64("SELECT count(*) FROM items WHERE id = 1 AND name = 'by hand'"),
        1
    );
    assert_eq!(
        node.query_i64(&format!(
            "SELECT count(*) FROM (SELECT pk FROM _driftless_rows ORDER BY seq DESC LIMIT 1) \
             WHERE pk = X'{}'",
            driftless_core::PrimaryKey::integer(1)
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )),
        1
    );
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("driftless_drift_incidents_total{table=\"items\"} 1"),
        "{metrics}"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_is_reconciled_without_overwriting_newer_writes() {
    let mut p = pair().await;
    p.edge.stop().await.unwrap();
    let backup = p.edge.db.with_extension("backup");
    rusqlite::Connection::open(&p.edge.db)
        .unwrap()
        .execute_batch(&format!("VACUUM INTO '{}'", backup.display()))
        .unwrap();
    p.edge.restart(p.edge_addr).await;
    // after the backup: new writes on both sides, replicated
    p.edge.sql("UPDATE items SET name = 'newer, from the edge' WHERE id = 3; INSERT INTO items VALUES (300, 'edge row', 1.0, 1);");
    p.hub.sql("UPDATE items SET name = 'newer, from the hub' WHERE id = 4; DELETE FROM items WHERE id = 5;");
    converge(&[&p.hub, &p.edge]).await;
    // the edge's disk is restored from the backup
    p.edge.stop().await.unwrap();
    for suffix in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(p.edge.db.with_extension(suffix));
    }
    std::fs::copy(&backup, &p.edge.db).unwrap();
    p.edge.restart(p.edge_addr).await;
    eventually("the link", async || {
        p.edge.status().await.peers.iter().any(|l| l.connected)
    })
    .await;
    // a write made after the restore reaches the hub by streaming, although the restored log
    // reuses sequence numbers the hub had already applied: the edge notices the hub's cursor
    // beyond its log's end and re-bootstraps it with a snapshot
    p.edge
        .sql("INSERT INTO items VALUES (301, 'after the restore', 1.0, 1);");
    eventually("the post-restore write to reach the hub", async || {
        p.hub.query_i64("SELECT count(*) FROM items WHERE id = 301") == 1
    })
    .await;
    // streaming brings the hub's later changes back, but not the edge's own lost ones
    eventually("the hub's changes to arrive again", async || {
        p.edge
            .query_i64("SELECT count(*) FROM items WHERE id = 4 AND name = 'newer, from the hub'")
            == 1
    })
    .await;
    let diff = request_reconcile(p.edge.admin, "hub", None, false)
        .await
        .unwrap();
    assert!(diff.found_differences(), "{diff:?}");
    request_reconcile(p.edge.admin, "hub", None, true)
        .await
        .unwrap();
    converge(&[&p.hub, &p.edge]).await;
    for node in [&p.hub, &p.edge] {
        // nothing newer was overwritten by the old backup
        assert_eq!(
            node.query_i64(
                "SELECT count(*) FROM items WHERE id = 3 AND name = 'newer, from the edge'"
            ),
            1
        );
        assert_eq!(
            node.query_i64(
                "SELECT count(*) FROM items WHERE id = 4 AND name = 'newer, from the hub'"
            ),
            1
        );
        assert_eq!(node.query_i64("SELECT count(*) FROM items WHERE id = 5"), 0);
        assert_eq!(
            node.query_i64("SELECT count(*) FROM items WHERE id = 300"),
            1
        );
        assert_eq!(
            node.query_i64("SELECT count(*) FROM items WHERE id = 301"),
            1
        );
    }
    p.edge.stop().await.unwrap();
    p.hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_never_overwrites_a_newer_concurrent_write() {
    let mut p = pair().await;
    p.edge.stop().await.unwrap();
    // while the link is down: the hub writes row 7 (newer); the edge's own copy of row 7 is
    // edited behind driftless's back, and the edge writes row 8 legitimately (newer than the hub's)
    p.hub
        .sql("UPDATE items SET name = 'hub, newest' WHERE id = 7");
    p.edge.sql(
        "DROP TRIGGER _driftless_upd_items; UPDATE items SET name = 'stale edit' WHERE id = 7;",
    );
    p.edge.restart(p.edge_addr).await;
    // (once the node runs, capture is reinstalled; a write before that would count as drift)
    eventually("the link", async || {
        p.edge.status().await.peers.iter().any(|l| l.connected)
    })
    .await;
    p.edge
        .sql("UPDATE items SET name = 'edge, newest' WHERE id = 8");
    request_reconcile_with(p.edge.admin, "hub", None, local(true))
        .await
        .unwrap();
    converge(&[&p.hub, &p.edge]).await;
    for node in [&p.hub, &p.edge] {
        assert_eq!(
            node.query_i64("SELECT count(*) FROM items WHERE id = 7 AND name = 'hub, newest'"),
            1
        );
        assert_eq!(
            node.query_i64("SELECT count(*) FROM items WHERE id = 8 AND name = 'edge, newest'"),
            1
        );
    }
    p.edge.stop().await.unwrap();
    p.hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_local_check_reports_its_progress_while_it_runs() {
    let mut p = pair().await;
    // enough rows that the local check takes many chunks of 5,000 on each side
    p.hub.sql(
        "WITH RECURSIVE g(i) AS (SELECT 1000 UNION ALL SELECT i + 1 FROM g WHERE i < 60999)
         INSERT INTO items SELECT i, 'bulk ' || i, i, 1 FROM g;",
    );
    converge(&[&p.hub, &p.edge]).await;
    let admin = p.edge.admin;
    let run =
        tokio::spawn(async move { request_reconcile_with(admin, "hub", None, local(false)).await });
    let mut seen = Vec::new();
    while !run.is_finished() {
        if let Ok(Some(progress)) = driftless_node::ops::fetch_reconcile_progress(admin).await {
            seen.push(progress);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let report = run.await.unwrap().unwrap();
    assert!(!report.found_differences(), "{report:?}");
    let local: Vec<_> = seen
        .iter()
        .filter(|p| p.phase == "local check, both sides")
        .collect();
    assert!(!local.is_empty(), "no local-check progress seen: {seen:?}");
    for progress in &local {
        assert_eq!(
            (progress.peer.as_str(), progress.table.as_str()),
            ("hub", "items")
        );
        assert!(progress.done <= progress.total, "{progress:?}");
        assert_eq!(progress.tables_total, 1);
    }
    // it moved, and the total is about both sides' rows (60,200 each)
    assert!(local.iter().any(|p| p.done > 0), "{local:?}");
    assert!(local.iter().all(|p| p.total >= 120_400), "{local:?}");
    // and nothing is shown once the run is over
    assert_eq!(
        driftless_node::ops::fetch_reconcile_progress(admin)
            .await
            .unwrap(),
        None
    );
    p.edge.stop().await.unwrap();
    p.hub.stop().await.unwrap();
}
