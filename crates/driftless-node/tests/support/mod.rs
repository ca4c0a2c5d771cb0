//! Helpers for in-process node tests: nodes started with `run(config, listeners, shutdown)` on
//! ports bound by the test, SQLite replicas written with plain SQL, convergence by digests.

#![allow(dead_code)]

use driftless_node::digest::{TableDigest, table_digests};
use driftless_node::{Config, Listeners, NodeError, NodeStatus, run};
use rusqlite::Connection;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, name TEXT, price REAL, stock INTEGER NOT NULL DEFAULT 0);";

/// A node's sockets, bound before any config is written so peers can name the ports.
pub struct Ports {
    pub peers: TcpListener,
    pub admin: TcpListener,
}

impl Ports {
    pub async fn bind() -> Ports {
        Ports {
            peers: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }
    pub fn peer_addr(&self) -> SocketAddr {
        self.peers.local_addr().unwrap()
    }
}

pub struct TestNode {
    pub name: String,
    pub db: PathBuf,
    pub config_path: PathBuf,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), NodeError>>>,
}

/// The `[listen]` and `[[peers]]` parts of a config are given by the test; the rest is common.
pub fn config_text(name: &str, listen: &str, peers: &str) -> String {
    format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"./{name}\"\n\n\
         [store]\nkind = \"sqlite\"\npath = \"./{name}.db\"\n\n\
         [[tables]]\nname = \"items\"\ncolumns = {{ stock = \"counter\" }}\n\n\
         {listen}\n\n{peers}\n\n\
         [admin]\naddr = \"127.0.0.1:1\"\n\n\
         [sync]\nheartbeat_ms = 300\nreconnect_min_ms = 20\nreconnect_max_ms = 300\n"
    )
}

pub fn insecure_listen(ports: &Ports) -> String {
    format!(
        "[listen]\naddr = \"{}\"\ninsecure = true",
        ports.peer_addr()
    )
}

pub fn insecure_peer(name: &str, addr: SocketAddr) -> String {
    format!("[[peers]]\nname = \"{name}\"\naddr = \"{addr}\"\ninsecure = true\n")
}

impl TestNode {
    /// Writes the config and schema and starts the node in this process.
    pub async fn start(dir: &Path, name: &str, ports: Ports, config: String) -> TestNode {
        let config_path = dir.join(format!("{name}.toml"));
        let admin = ports.admin.local_addr().unwrap();
        std::fs::write(
            &config_path,
            config.replace("127.0.0.1:1\"", &format!("{admin}\"")),
        )
        .unwrap();
        let db = dir.join(format!("{name}.db"));
        Connection::open(&db)
            .unwrap()
            .execute_batch(SCHEMA)
            .unwrap();
        let mut node = TestNode {
            name: name.into(),
            db,
            config_path,
            admin,
            stop: None,
            task: None,
        };
        node.run(ports).await;
        node
    }

    async fn run(&mut self, ports: Ports) {
        let config = Config::load(&self.config_path).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = Listeners {
            peers: Some(ports.peers),
            admin: Some(ports.admin),
        };
        self.task = Some(tokio::spawn(run(config, listeners, async move {
            let _ = stopped.await;
        })));
        self.stop = Some(stop);
    }

    /// Graceful stop; returns the node's result.
    pub async fn stop(&mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        }
    }

    /// Whether the node's `run` has returned (on its own: it was not stopped).
    pub fn has_exited(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Starts again on the same addresses.
    pub async fn restart(&mut self, peer_addr: SocketAddr) {
        let ports = Ports {
            peers: TcpListener::bind(peer_addr).await.unwrap(),
            admin: TcpListener::bind(self.admin).await.unwrap(),
        };
        self.run(ports).await;
    }

    pub fn sql(&self, sql: &str) {
        let conn = Connection::open(&self.db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    pub fn query_i64(&self, sql: &str) -> i64 {
        let conn = Connection::open(&self.db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    pub fn digest(&self) -> Vec<TableDigest> {
        table_digests(&self.db, &["items"]).unwrap()
    }

    pub async fn status(&self) -> NodeStatus {
        driftless_node::ops::fetch_status(self.admin).await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        driftless_node::ops::fetch_metrics(self.admin)
            .await
            .unwrap()
    }
}

/// Waits until all nodes hold identical `items` tables; panics with the digests otherwise.
pub async fn converge(nodes: &[&TestNode]) {
    let started = Instant::now();
    loop {
        let digests: Vec<_> = nodes.iter().map(|n| n.digest()).collect();
        if digests.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let shown: Vec<String> = nodes
                .iter()
                .zip(&digests)
                .map(|(n, d)| format!("{}: {d:?}", n.name))
                .collect();
            panic!("no convergence after 60 s:\n{}", shown.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `check` holds, or panics with `what`.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
