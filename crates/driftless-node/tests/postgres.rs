//! A PostgreSQL hub with SQLite spokes, all real nodes (`run(config, listeners, shutdown)`) and a
//! real PostgreSQL server: writes on any side reach every other, through the hub, and concurrent
//! counter increments add up everywhere. Each run creates its own database and drops it.
//! Without a reachable server the test is skipped with a reason; under CI it fails.

mod support;

use postgres::{Client, NoTls};
use std::time::{Duration, Instant};
use support::*;

fn admin_url() -> String {
    std::env::var("DRIFTLESS_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

struct Database {
    name: String,
    url: String,
}

impl Database {
    fn create() -> Option<Database> {
        let admin = admin_url();
        let mut client = match Client::connect(&admin, NoTls) {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI needs PostgreSQL at {admin:?}: {e}"
                );
                eprintln!("skipped: PostgreSQL unreachable at {admin:?}: {e}");
                return None;
            }
        };
        let name = format!("driftless_node_test_{}", std::process::id());
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .unwrap();
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap();
        let url = admin
            .split_whitespace()
            .filter(|p| !p.starts_with("dbname="))
            .chain(std::iter::once(format!("dbname={name}").as_str()))
            .collect::<Vec<_>>()
            .join(" ");
        Some(Database { name, url })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&admin_url(), NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

type Rows = Vec<(i64, Option<String>, Option<f64>, i64)>;

fn pg_rows(client: &mut Client) -> Rows {
    client
        .query(
            "SELECT id::bigint, name, price, stock FROM items ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn sqlite_rows(node: &TestNode) -> Rows {
    let conn = rusqlite::Connection::open(&node.db).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, name, price, stock FROM items ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn until_equal(url: &str, spokes: &[&TestNode]) -> Rows {
    let started = Instant::now();
    loop {
        let hub = with_pg(url, pg_rows).await;
        if spokes.iter().all(|s| sqlite_rows(s) == hub) {
            return hub;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no convergence:\nhub {hub:?}\n{}",
            spokes
                .iter()
                .map(|s| format!("{} {:?}", s.name, sqlite_rows(s)))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `f` with a fresh client on a blocking thread (the sync client must not run on the
/// runtime's worker threads).
async fn with_pg<T: Send + 'static>(
    url: &str,
    f: impl FnOnce(&mut Client) -> T + Send + 'static,
) -> T {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || f(&mut Client::connect(&url, NoTls).unwrap()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_hub_relays_between_sqlite_spokes() {
    let Some(db) = tokio::task::spawn_blocking(Database::create).await.unwrap() else {
        return;
    };
    let url = db.url.clone();
    with_pg(&url, |pg| {
        pg.batch_execute(
            "CREATE TABLE items (id integer PRIMARY KEY, name text, price double precision, stock bigint NOT NULL DEFAULT 0)",
        )
        .unwrap()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let hub_cfg = config_text("hub", &insecure_listen(&hub_ports), "").replace(
        "[store]\nkind = \"sqlite\"\npath = \"./hub.db\"",
        &format!("[store]\nkind = \"postgres\"\nurl = \"{}\"", db.url),
    );
    let mut hub = TestNode::start(dir.path(), "hub", hub_ports, hub_cfg).await;
    let mut s1 = TestNode::start(
        dir.path(),
        "s1",
        Ports::bind().await,
        config_text("s1", "", &insecure_peer("hub", hub_addr)),
    )
    .await;
    let mut s2 = TestNode::start(
        dir.path(),
        "s2",
        Ports::bind().await,
        config_text("s2", "", &insecure_peer("hub", hub_addr)),
    )
    .await;

    eventually("the spokes to connect", async || {
        hub.status()
            .await
            .peers
            .iter()
            .filter(|p| p.connected)
            .count()
            == 2
    })
    .await;
    s1.sql("INSERT INTO items VALUES (1, 'from s1', 1.5, 10)");
    with_pg(&url, |pg| {
        pg.batch_execute("INSERT INTO items VALUES (2, 'from the hub', 2.25, 20)")
            .unwrap()
    })
    .await;
    let rows = until_equal(&url, &[&s1, &s2]).await;
    assert_eq!(rows.len(), 2);

    // concurrent increments on all three replicas, and conflicting names
    s1.sql("UPDATE items SET stock = stock - 1, name = 's1 was here' WHERE id = 1");
    s2.sql("UPDATE items SET stock = stock - 2 WHERE id = 1");
    with_pg(&url, |pg| {
        pg.batch_execute("UPDATE items SET stock = stock - 3 WHERE id = 1; UPDATE items SET price = 9.75 WHERE id = 2")
            .unwrap()
    })
    .await;
    let rows = until_equal(&url, &[&s1, &s2]).await;
    assert_eq!(
        rows[0].3,
        10 - 1 - 2 - 3,
        "counter increments add up: {rows:?}"
    );
    assert_eq!(rows[1].2, Some(9.75));
    assert_eq!(rows[0].1.as_deref(), Some("s1 was here"));

    // diff and reconcile work with a PostgreSQL replica: agreement first, then a row edited
    // behind driftless's back on PostgreSQL (capture disabled) is found and restored
    let diff = driftless_node::ops::request_reconcile(s1.admin, "hub", None, false)
        .await
        .unwrap();
    assert!(!diff.found_differences(), "{diff:?}");
    with_pg(&url, |pg| {
        pg.batch_execute(
            "ALTER TABLE items DISABLE TRIGGER driftless_capture_v1;
             UPDATE items SET name = 'behind its back' WHERE id = 2;
             ALTER TABLE items ENABLE TRIGGER driftless_capture_v1;",
        )
        .unwrap()
    })
    .await;
    // comparing merge states alone cannot see it (capture never saw the edit) ...
    let states_only = driftless_node::ops::request_reconcile(hub.admin, "s1", None, false)
        .await
        .unwrap();
    assert!(!states_only.found_differences(), "{states_only:?}");
    // ... the local check does, on this side and on the peer's
    let local = |repair| driftless_node::reconcile::ReconcileOptions {
        repair,
        local_check: true,
    };
    let found = driftless_node::ops::request_reconcile_with(hub.admin, "s1", None, local(false))
        .await
        .unwrap();
    assert!(found.found_differences(), "{found:?}");
    assert_eq!(found.tables[0].local_restored, 1, "{found:?}");
    let from_s1 = driftless_node::ops::request_reconcile_with(s1.admin, "hub", None, local(false))
        .await
        .unwrap();
    assert_eq!(from_s1.tables[0].peer_restored, 1, "{from_s1:?}");
    driftless_node::ops::request_reconcile_with(hub.admin, "s1", None, local(true))
        .await
        .unwrap();
    let rows = until_equal(&url, &[&s1, &s2]).await;
    assert_eq!(rows[1].1.as_deref(), Some("from the hub"), "{rows:?}");

    // the hub's status names its store without secrets
    let status = hub.status().await;
    assert!(
        status.store.contains("dbname=driftless_node_test"),
        "{}",
        status.store
    );
    for node in [&mut s1, &mut s2, &mut hub] {
        node.stop().await.unwrap();
    }
    tokio::task::spawn_blocking(move || drop(db)).await.unwrap();
}
