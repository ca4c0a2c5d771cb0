//! End-to-end tests of the built `driftless` binary: every node is a separate OS process
//! (`driftless run -c FILE`) with its own SQLite file, TOML config and data directory in a
//! temporary directory, linked over plaintext TCP on 127.0.0.1. The tests write to the replicas
//! the way a user's application would (plain SQL through their own `rusqlite` connections) and
//! check convergence by reading the SQLite files directly (`driftless_node::digest`): a mesh and
//! a hub with spokes through conflicting writes, a node killed with SIGKILL mid-stream, a peer
//! stopped with SIGTERM while the other side keeps writing, and the operator commands
//! (`status`, `dlq`, `conflicts`) against a running node.
//!
//! Run: `cargo test -p driftless --test processes` (add `-- --nocapture` to see progress). Each
//! node's stderr is kept in its temp dir and printed in every failure message. The random moment
//! of the SIGKILL comes from the clock; replay one with `DRIFTLESS_SEED=<seed>` (printed on
//! failure).

use driftless_node::digest::{TableDigest, table_digests};
use rusqlite::Connection;
use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_driftless");
const SCHEMA: &str = "CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    name TEXT,
    price REAL,
    stock INTEGER NOT NULL DEFAULT 0
);";
/// How long replicas get to converge (the machine may be small and shared; debug build).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a started node gets to answer on its admin port.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node gets to exit after SIGTERM.
const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(10);
/// The tail of each node's stderr shown in failure messages.
const LOG_TAIL_BYTES: usize = 24 * 1024;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// How one node is wired: whether it listens for peers, and which nodes it dials.
struct Spec {
    name: &'static str,
    listen: bool,
    dials: &'static [&'static str],
}

/// One node process. Dropping it kills the process (SIGKILL), so a failing test leaves no
/// stray nodes behind.
struct Node {
    name: String,
    config: PathBuf,
    db: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A set of nodes in one temp dir. Field order matters: the nodes (and their processes) are
/// dropped before the directory is deleted.
struct Cluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// Distinct free ports: all are bound at once (so they differ), then released for the nodes.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn config_text(
    spec: &Spec,
    listen_port: Option<u16>,
    admin_port: u16,
    peers: &[(&str, u16)],
) -> String {
    let name = spec.name;
    let mut text = format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"./{name}-data\"\n\n\
         [store]\nkind = \"sqlite\"\npath = \"./{name}.db\"\n\n\
         [[tables]]\nname = \"items\"\ncolumns = {{ stock = \"counter\" }}\n\n"
    );
    if let Some(port) = listen_port {
        let _ = write!(
            text,
            "[listen]\naddr = \"127.0.0.1:{port}\"\ninsecure = true\n\n"
        );
    }
    let _ = write!(
        text,
        "[admin]\naddr = \"127.0.0.1:{admin_port}\"\n\n[sync]\nheartbeat_ms = 500\nreconnect_max_ms = 500\n"
    );
    for (peer, port) in peers {
        let _ = write!(
            text,
            "\n[[peers]]\nname = \"{peer}\"\naddr = \"127.0.0.1:{port}\"\ninsecure = true\n"
        );
    }
    text
}

fn open(db: &Path) -> Connection {
    let conn = Connection::open(db).unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    conn.busy_timeout(Duration::from_secs(60))
        .expect("busy timeout");
    conn
}

/// Runs SQL on a replica the way an application would: its own connection, plain SQL.
fn exec(db: &Path, sql: &str) {
    open(db)
        .execute_batch(sql)
        .unwrap_or_else(|e| panic!("{}: {sql}: {e}", db.display()));
}

/// Inserts rows `ids` with stock `stock`, in one transaction.
fn insert_rows(db: &Path, ids: std::ops::RangeInclusive<i64>, stock: i64) {
    let mut conn = open(db);
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("begin");
    {
        let mut stmt = tx
            .prepare("INSERT INTO items (id, name, price, stock) VALUES (?1, ?2, ?3, ?4)")
            .expect("prepare");
        for id in ids {
            stmt.execute(rusqlite::params![
                id,
                format!("item {id}"),
                id as f64 / 4.0,
                stock
            ])
            .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// `(rows, total stock)` of a replica.
fn count_and_stock(db: &Path) -> rusqlite::Result<(i64, i64)> {
    open(db).query_row(
        "SELECT count(*), coalesce(sum(stock), 0) FROM items",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

fn row_count(db: &Path) -> i64 {
    count_and_stock(db).map(|(n, _)| n).unwrap_or(-1)
}

/// One item's `(name, price, stock)`.
fn item(db: &Path, id: i64) -> rusqlite::Result<(Option<String>, Option<f64>, i64)> {
    open(db).query_row(
        "SELECT name, price, stock FROM items WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

fn tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
            let mut text = String::from_utf8_lossy(&bytes[start..]).into_owned();
            if start > 0 {
                text.insert_str(0, "[... earlier output cut ...]\n");
            }
            text
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

impl Cluster {
    /// Writes each node's config, creates the schema in each SQLite file; starts nothing.
    fn new(specs: &[Spec]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(specs.len() * 2);
        let listen_port = |name: &str| {
            let i = specs
                .iter()
                .position(|s| s.name == name)
                .unwrap_or_else(|| panic!("no node {name}"));
            assert!(specs[i].listen, "{name} is dialed but does not listen");
            ports[2 * i]
        };
        let mut nodes = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let peers: Vec<(&str, u16)> = spec.dials.iter().map(|p| (*p, listen_port(p))).collect();
            let config = dir.path().join(format!("{}.toml", spec.name));
            std::fs::write(
                &config,
                config_text(
                    spec,
                    spec.listen.then_some(ports[2 * i]),
                    ports[2 * i + 1],
                    &peers,
                ),
            )
            .expect("write config");
            let db = dir.path().join(format!("{}.db", spec.name));
            exec(&db, SCHEMA);
            nodes.push(Node {
                name: spec.name.to_owned(),
                config,
                db,
                log: dir.path().join(format!("{}.stderr.log", spec.name)),
                admin: SocketAddr::from(([127, 0, 0, 1], ports[2 * i + 1])),
                child: None,
            });
        }
        Cluster { nodes, dir }
    }

    /// Two running nodes: `a` dials `b`.
    fn pair() -> Cluster {
        let mut cluster = Cluster::new(&[
            Spec {
                name: "a",
                listen: false,
                dials: &["b"],
            },
            Spec {
                name: "b",
                listen: true,
                dials: &[],
            },
        ]);
        cluster.start(&["a", "b"]);
        cluster
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node(&self, name: &str) -> &Node {
        &self.nodes[self.index(name)]
    }

    fn db(&self, name: &str) -> PathBuf {
        self.node(name).db.clone()
    }

    fn config(&self, name: &str) -> PathBuf {
        self.node(name).config.clone()
    }

    /// Every node's stderr (the tail), for failure messages.
    fn logs(&self) -> String {
        let mut out = format!("\n==== node logs (in {}) ====\n", self.dir.path().display());
        for node in &self.nodes {
            let _ = write!(out, "\n---- {} ----\n{}\n", node.name, tail(&node.log));
        }
        out
    }

    /// Starts the node's process (appending to its stderr file) without waiting for it.
    fn spawn(&mut self, name: &str) {
        let i = self.index(name);
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{name} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open stderr log");
        let child = Command::new(BIN)
            .arg("run")
            .arg("-c")
            .arg(&node.config)
            .current_dir(self.dir.path())
            .env("DRIFTLESS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        node.child = Some(child);
    }

    /// Waits until the node answers on its admin port (so its peer port is bound too).
    fn wait_ready(&mut self, name: &str) {
        let i = self.index(name);
        let started = Instant::now();
        loop {
            let node = &mut self.nodes[i];
            let child = node.child.as_mut().expect("started");
            if let Some(status) = child.try_wait().expect("try_wait") {
                node.child = None;
                panic!(
                    "node {name} exited during startup with {status}{}",
                    self.logs()
                );
            }
            if TcpStream::connect_timeout(&node.admin, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "node {name} did not open its admin port within {READY_TIMEOUT:?}{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(&mut self, names: &[&str]) {
        for name in names {
            self.spawn(name);
        }
        for name in names {
            self.wait_ready(name);
        }
    }

    /// SIGKILL, as `Child::kill` sends on Unix.
    fn kill(&mut self, name: &str) {
        let i = self.index(name);
        let mut child = self.nodes[i].child.take().expect("running");
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    /// SIGTERM through the `kill` command; returns the exit status, or None if the process was
    /// still running after `GRACEFUL_TIMEOUT` (it is then killed).
    fn terminate(&mut self, name: &str) -> Option<ExitStatus> {
        let i = self.index(name);
        let mut child = self.nodes[i].child.take().expect("running");
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed: {sent}");
        let started = Instant::now();
        while started.elapsed() < GRACEFUL_TIMEOUT {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Runs a CLI command (`status`, `dlq`, ...) and returns its output.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {BIN} {args:?}: {e}"))
    }

    /// Runs a CLI command that prints JSON; fails the test unless it succeeds.
    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "driftless {args:?} failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}{}",
            out.status,
            self.logs()
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("driftless {args:?} printed no JSON ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}")
        })
    }

    fn digests(&self, names: &[&str]) -> Vec<rusqlite::Result<Vec<TableDigest>>> {
        names
            .iter()
            .map(|n| table_digests(&self.db(n), &["items"]))
            .collect()
    }

    /// Polls every 20 ms until the named replicas hold identical `items` tables and `done`
    /// holds on each of them; returns the common digest. Fails the test after
    /// `CONVERGE_TIMEOUT`, showing the digests, `describe` of each replica, and the logs.
    fn converge(
        &self,
        names: &[&str],
        what: &str,
        done: impl Fn(&Path) -> rusqlite::Result<bool>,
        describe: impl Fn(&Path) -> String,
    ) -> Vec<TableDigest> {
        let started = Instant::now();
        loop {
            let digests = self.digests(names);
            if let Some(Ok(first)) = digests.first()
                && digests.iter().all(|d| d.as_ref().is_ok_and(|d| d == first))
                && names.iter().all(|n| done(&self.db(n)).unwrap_or(false))
            {
                return first.clone();
            }
            if started.elapsed() > CONVERGE_TIMEOUT {
                let mut state = String::new();
                for (name, digest) in names.iter().zip(&digests) {
                    let _ = writeln!(state, "  {name}: {digest:?}; {}", describe(&self.db(name)));
                }
                panic!(
                    "{what}: not converged after {CONVERGE_TIMEOUT:?}:\n{state}{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that the named replicas hold identical `items` tables right now.
    fn assert_identical(&self, names: &[&str]) -> Vec<TableDigest> {
        let digests: Vec<Vec<TableDigest>> = self
            .digests(names)
            .into_iter()
            .map(|d| d.expect("digest"))
            .collect();
        for (name, d) in names.iter().zip(&digests) {
            assert_eq!(
                d,
                &digests[0],
                "{name} differs from {}{}",
                names[0],
                self.logs()
            );
        }
        digests[0].clone()
    }
}

fn describe_counts(db: &Path) -> String {
    match count_and_stock(db) {
        Ok((rows, stock)) => format!("{rows} rows, total stock {stock}"),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// SplitMix64 over a seed from `DRIFTLESS_SEED` or the clock.
struct Rng(u64);

impl Rng {
    fn from_env() -> (Rng, u64) {
        let seed = std::env::var("DRIFTLESS_SEED")
            .ok()
            .and_then(|s| s.trim_start_matches("0x").parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64
            });
        (Rng(seed), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Runs `f(i)` for each `i` on its own thread, all released at the same moment.
fn concurrently(n: usize, f: impl Fn(usize) + Send + Sync + 'static) {
    let barrier = Arc::new(Barrier::new(n));
    let f = Arc::new(f);
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                barrier.wait();
                f(i)
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread panicked");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn three_process_mesh_converges_through_conflicting_writes() {
    const ROUNDS: i64 = 40;
    let mut cluster = Cluster::new(&[
        Spec {
            name: "a",
            listen: true,
            dials: &["b", "c"],
        },
        Spec {
            name: "b",
            listen: true,
            dials: &["c"],
        },
        Spec {
            name: "c",
            listen: true,
            dials: &[],
        },
    ]);
    let all = ["a", "b", "c"];
    cluster.start(&all);

    exec(
        &cluster.db("a"),
        "INSERT INTO items (id, name, price, stock) VALUES
            (1, 'tea', 2.0, 0), (2, 'coffee', 3.5, 1000), (3, 'cocoa', 4.0, 7);",
    );
    cluster.converge(
        &all,
        "the first inserts",
        |db| Ok(count_and_stock(db)? == (3, 1007)),
        describe_counts,
    );

    // Concurrently: a and b overwrite the same cell (price of 1) again and again, c renames it
    // (another column), and all three sell coffee (a counter) and write their own rows.
    let dbs: Vec<PathBuf> = all.iter().map(|n| cluster.db(n)).collect();
    concurrently(3, move |i| {
        let db = &dbs[i];
        for round in 0..ROUNDS {
            let own_row = 100 * (i as i64 + 1) + round;
            let sql = match i {
                0 => format!(
                    "UPDATE items SET price = {} WHERE id = 1;",
                    10.0 + round as f64
                ),
                1 => format!(
                    "UPDATE items SET price = {} WHERE id = 1;",
                    20.0 + round as f64
                ),
                _ => format!("UPDATE items SET name = 'green tea {round}' WHERE id = 1;"),
            };
            exec(
                db,
                &format!(
                    "{sql}
                     UPDATE items SET stock = stock - {} WHERE id = 2;
                     INSERT INTO items (id, name, price, stock) VALUES ({own_row}, 'own', 1.0, 1);
                     UPDATE items SET price = {round} WHERE id = 3;",
                    i + 1
                ),
            );
        }
    });

    let last_a = 10.0 + (ROUNDS - 1) as f64;
    let last_b = 20.0 + (ROUNDS - 1) as f64;
    let coffee = 1000 - ROUNDS * (1 + 2 + 3);
    let rows = 3 + 3 * ROUNDS;
    let expected = |db: &Path| -> rusqlite::Result<bool> {
        let (name, price, _) = item(db, 1)?;
        Ok(count_and_stock(db)?.0 == rows
            && item(db, 2)?.2 == coffee
            && name.as_deref() == Some(&*format!("green tea {}", ROUNDS - 1))
            && (price == Some(last_a) || price == Some(last_b)))
    };
    let describe = |db: &Path| {
        format!(
            "{}; item 1 {:?}; item 2 {:?}; item 3 {:?}",
            describe_counts(db),
            item(db, 1),
            item(db, 2),
            item(db, 3)
        )
    };
    cluster.converge(&all, "the concurrent writes", expected, describe);

    // The replicas are identical and hold the expected values.
    cluster.assert_identical(&all);
    let logs = cluster.logs();
    for node in all {
        let db = cluster.db(node);
        let (name, price, _) = item(&db, 1).expect("item 1");
        assert_eq!(
            name.as_deref(),
            Some(&*format!("green tea {}", ROUNDS - 1)),
            "{node}{logs}"
        );
        assert!(
            price == Some(last_a) || price == Some(last_b),
            "{node}: the price of item 1 is {price:?}, not the last write of a ({last_a}) or b ({last_b}){logs}"
        );
        assert_eq!(
            item(&db, 2).expect("item 2").2,
            coffee,
            "{node}: coffee stock{logs}"
        );
        assert_eq!(
            item(&db, 3).expect("item 3").1,
            Some((ROUNDS - 1) as f64),
            "{node}{logs}"
        );
        let (count, stock) = count_and_stock(&db).expect("count");
        assert_eq!(count, rows, "{node}{logs}");
        assert_eq!(stock, coffee + 7 + 3 * ROUNDS, "{node}: total stock{logs}");
    }
}

#[test]
fn hub_with_three_spokes_relays_between_spokes() {
    const ROUNDS: i64 = 25;
    let mut cluster = Cluster::new(&[
        Spec {
            name: "hub",
            listen: true,
            dials: &[],
        },
        Spec {
            name: "s1",
            listen: false,
            dials: &["hub"],
        },
        Spec {
            name: "s2",
            listen: false,
            dials: &["hub"],
        },
        Spec {
            name: "s3",
            listen: false,
            dials: &["hub"],
        },
    ]);
    let all = ["hub", "s1", "s2", "s3"];
    cluster.start(&all);

    // A write on s1 reaches s2 and s3, which are linked only to the hub.
    exec(
        &cluster.db("s1"),
        "INSERT INTO items (id, name, price, stock) VALUES (1, 'from s1', 1.5, 500);",
    );
    cluster.converge(
        &all,
        "s1's insert relayed through the hub",
        |db| Ok(item(db, 1)? == (Some("from s1".into()), Some(1.5), 500)),
        |db| format!("{}; item 1 {:?}", describe_counts(db), item(db, 1)),
    );

    // Concurrent writes on all spokes: the same cell, a shared counter, and own rows.
    let dbs: Vec<PathBuf> = ["s1", "s2", "s3"].iter().map(|n| cluster.db(n)).collect();
    concurrently(3, move |i| {
        let db = &dbs[i];
        let spoke = i as i64 + 1;
        for round in 0..ROUNDS {
            exec(
                db,
                &format!(
                    "UPDATE items SET name = 's{spoke} round {round}' WHERE id = 1;
                     UPDATE items SET stock = stock - {spoke} WHERE id = 1;
                     INSERT INTO items (id, name, price, stock) VALUES ({}, 's{spoke}', {round}, 2);",
                    1000 * spoke + round
                ),
            );
        }
    });
    let stock = 500 - ROUNDS * (1 + 2 + 3);
    let rows = 1 + 3 * ROUNDS;
    let last_names: Vec<String> = (1..=3)
        .map(|s| format!("s{s} round {}", ROUNDS - 1))
        .collect();
    let expected = {
        let last_names = last_names.clone();
        move |db: &Path| -> rusqlite::Result<bool> {
            let (name, _, s) = item(db, 1)?;
            Ok(count_and_stock(db)? == (rows, stock + 2 * 3 * ROUNDS)
                && s == stock
                && name.is_some_and(|n| last_names.contains(&n)))
        }
    };
    cluster.converge(&all, "the concurrent spoke writes", expected, |db| {
        format!("{}; item 1 {:?}", describe_counts(db), item(db, 1))
    });
    cluster.assert_identical(&all);
    let logs = cluster.logs();
    for node in all {
        let db = cluster.db(node);
        let (name, price, s) = item(&db, 1).expect("item 1");
        assert_eq!(s, stock, "{node}: counter{logs}");
        assert_eq!(price, Some(1.5), "{node}{logs}");
        let name = name.unwrap_or_default();
        assert!(last_names.contains(&name), "{node}: name {name:?}{logs}");
        for spoke in 1..=3 {
            for round in [0, ROUNDS - 1] {
                assert_eq!(
                    item(&db, 1000 * spoke + round).expect("own row"),
                    (Some(format!("s{spoke}")), Some(round as f64), 2),
                    "{node}{logs}"
                );
            }
        }
        assert_eq!(count_and_stock(&db).expect("count").0, rows, "{node}{logs}");
    }
}

/// Writes 20,000 rows on `db` in transactions of 1,000 (stock 1 each), then adds 1 to every
/// row's stock in 20 more transactions, pausing a little between transactions.
fn write_20k_then_increment(db: PathBuf) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for t in 0..20 {
            insert_rows(&db, t * 1000 + 1..=(t + 1) * 1000, 1);
            std::thread::sleep(Duration::from_millis(20));
        }
        for t in 0..20 {
            exec(
                &db,
                &format!(
                    "UPDATE items SET stock = stock + 1 WHERE id BETWEEN {} AND {}",
                    t * 1000 + 1,
                    (t + 1) * 1000
                ),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

#[test]
fn a_node_killed_with_sigkill_mid_stream_catches_up_without_loss_or_duplicates() {
    const ROWS: i64 = 20_000;
    const ATTEMPTS: usize = 5;
    let (mut rng, seed) = Rng::from_env();
    for attempt in 1..=ATTEMPTS {
        let mut cluster = Cluster::pair();
        let (a, b) = (cluster.db("a"), cluster.db("b"));
        let writer = write_20k_then_increment(a.clone());

        // Kill b once it has applied at least `threshold` rows (and a random moment later),
        // while it is still behind.
        let threshold = rng.between(1, 18_000) as i64;
        let extra = Duration::from_millis(rng.between(0, 40));
        let started = Instant::now();
        let seen = loop {
            let n = row_count(&b);
            if n >= threshold || started.elapsed() > CONVERGE_TIMEOUT {
                break n;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            seen >= threshold,
            "seed {seed}: b never got to {threshold} rows (it has {seen}){}",
            cluster.logs()
        );
        std::thread::sleep(extra);
        cluster.kill("b");
        let at_kill = row_count(&b);
        if !(1..ROWS).contains(&at_kill) {
            eprintln!(
                "attempt {attempt}: b had {at_kill} rows when killed (threshold {threshold}); trying another moment"
            );
            writer.join().expect("writer");
            continue;
        }
        eprintln!(
            "attempt {attempt}: killed b with {at_kill} of {ROWS} rows applied (seed {seed})"
        );

        // b comes back with the same config and catches up.
        cluster.start(&["b"]);
        writer.join().expect("writer");
        cluster.converge(
            &["a", "b"],
            &format!("b after the SIGKILL at {at_kill} rows (seed {seed})"),
            |db| Ok(count_and_stock(db)? == (ROWS, 2 * ROWS)),
            describe_counts,
        );
        let digest = cluster.assert_identical(&["a", "b"]);
        assert_eq!(digest[0].rows, ROWS as u64);
        let logs = cluster.logs();
        for (name, db) in [("a", &a), ("b", &b)] {
            // every row once, and every increment applied exactly once
            assert_eq!(
                count_and_stock(db).expect("count"),
                (ROWS, 2 * ROWS),
                "{name} (seed {seed}){logs}"
            );
            let wrong: i64 = open(db)
                .query_row("SELECT count(*) FROM items WHERE stock <> 2", [], |r| {
                    r.get(0)
                })
                .expect("query");
            assert_eq!(
                wrong, 0,
                "{name}: rows whose stock is not 2 (seed {seed}){logs}"
            );
        }
        return;
    }
    panic!("seed {seed}: could not kill b mid-stream in {ATTEMPTS} attempts");
}

#[test]
fn a_peer_down_during_10k_writes_catches_up() {
    let mut cluster = Cluster::pair();
    let (a, b) = (cluster.db("a"), cluster.db("b"));

    // The link works (a row arrives, then its deletion), so b has a cursor before it stops.
    exec(
        &a,
        "INSERT INTO items (id, name, price, stock) VALUES (0, 'warm-up', 0, 3);",
    );
    cluster.converge(
        &["a", "b"],
        "the warm-up row",
        |db| Ok(count_and_stock(db)? == (1, 3)),
        describe_counts,
    );
    exec(&a, "DELETE FROM items WHERE id = 0;");
    cluster.converge(
        &["a", "b"],
        "the warm-up delete",
        |db| Ok(count_and_stock(db)? == (0, 0)),
        describe_counts,
    );

    let status = cluster.terminate("b");
    assert!(
        status.is_some_and(|s| s.success()),
        "b did not exit with status 0 within {GRACEFUL_TIMEOUT:?} of SIGTERM: {status:?}{}",
        cluster.logs()
    );

    // While b is down: 10,000 rows on a, 500 on b's own file.
    for t in 0..10 {
        insert_rows(&a, t * 1000 + 1..=(t + 1) * 1000, 1);
    }
    insert_rows(&b, 20_001..=20_500, 2);

    cluster.start(&["b"]);
    cluster.converge(
        &["a", "b"],
        "b restarted after 10,000 writes on a",
        |db| Ok(count_and_stock(db)? == (10_500, 10_000 + 1_000)),
        describe_counts,
    );
    let digest = cluster.assert_identical(&["a", "b"]);
    assert_eq!(digest[0].rows, 10_500);
    let logs = cluster.logs();
    for (name, db) in [("a", &a), ("b", &b)] {
        assert_eq!(
            count_and_stock(db).expect("count"),
            (10_500, 11_000),
            "{name}{logs}"
        );
        assert_eq!(
            item(db, 0).ok(),
            None,
            "{name}: the deleted row is back{logs}"
        );
        assert_eq!(
            item(db, 20_500).expect("b's row"),
            (Some("item 20500".into()), Some(20_500.0 / 4.0), 2),
            "{name}{logs}"
        );
        assert_eq!(
            item(db, 10_000).expect("a's row"),
            (Some("item 10000".into()), Some(10_000.0 / 4.0), 1),
            "{name}{logs}"
        );
    }
}

#[test]
fn status_and_dlq_commands_work_against_a_running_node() {
    let mut cluster = Cluster::pair();
    let (a, b) = (cluster.db("a"), cluster.db("b"));
    exec(
        &a,
        "INSERT INTO items (id, name, price, stock) VALUES (1, 'tea', 2.0, 5), (2, 'coffee', 3.0, 5), (3, 'cocoa', 4.0, 5);",
    );
    cluster.converge(
        &["a", "b"],
        "the first rows",
        |db| Ok(count_and_stock(db)?.0 == 3),
        describe_counts,
    );

    // status: running, a connected, 3 rows. The link may be reconnecting at the moment we ask,
    // so ask until it is up (the last answer is shown on failure).
    let b_config = cluster.config("b").display().to_string();
    let started = Instant::now();
    let status = loop {
        let status = cluster.cli_json(&["status", "-c", &b_config, "--json"]);
        let connected = status["peers"].as_array().is_some_and(|peers| {
            peers
                .iter()
                .any(|p| p["name"] == "a" && p["connected"] == true)
        });
        if (status["running"] == true && connected) || started.elapsed() > CONVERGE_TIMEOUT {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let shown = serde_json::to_string_pretty(&status).expect("json");
    let logs = cluster.logs();
    assert_eq!(status["running"], true, "{shown}{logs}");
    assert_eq!(status["name"], "b", "{shown}");
    let peers = status["peers"].as_array().expect("peers is an array");
    let peer_a = peers
        .iter()
        .find(|p| p["name"] == "a")
        .unwrap_or_else(|| panic!("a not listed: {shown}{logs}"));
    assert_eq!(peer_a["connected"], true, "{shown}{logs}");
    assert_eq!(peer_a["direction"], "inbound", "{shown}");
    let tables = status["tables"].as_array().expect("tables is an array");
    let items = tables
        .iter()
        .find(|t| t["table"] == "items")
        .unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(items["rows"], 3, "{shown}");
    assert_eq!(items["dead_letters"], 0, "{shown}");

    // dlq list: nothing failed.
    let letters = cluster.cli_json(&["dlq", "list", "-c", &b_config, "--json"]);
    assert_eq!(letters, serde_json::json!([]), "{logs}");

    // A conflict: with a stopped, a and b both set the price of tea without seeing each other.
    let stopped = cluster.terminate("a");
    assert!(
        stopped.is_some_and(|s| s.success()),
        "a: {stopped:?}{}",
        cluster.logs()
    );
    exec(&a, "UPDATE items SET price = 9.5 WHERE id = 1;");
    exec(&b, "UPDATE items SET price = 7.25 WHERE id = 1;");
    cluster.start(&["a"]);
    let price = |db: &Path| item(db, 1).map(|(_, p, _)| p);
    cluster.converge(
        &["a", "b"],
        "the conflicting prices",
        |db| Ok(matches!(price(db)?, Some(p) if p == 9.5 || p == 7.25)),
        |db| format!("{}; item 1 {:?}", describe_counts(db), item(db, 1)),
    );
    let winner = price(&b).expect("price");

    // A ledger holds it, listed by a running node's `conflicts list`. Storage format 2 serves a
    // row's latest state, so a losing write superseded on its own node before that node sent
    // it never travels: then only the node that received the winner records the conflict
    // (docs/semantics.md, "The log is the states"). At least one ledger must hold it.
    let mut listed = Vec::new();
    for node in ["b", "a"] {
        let config = cluster.config(node).display().to_string();
        let conflicts = cluster.cli_json(&["conflicts", "list", "-c", &config, "--json"]);
        let shown = serde_json::to_string_pretty(&conflicts).expect("json");
        let logs = cluster.logs();
        let list = conflicts
            .as_array()
            .unwrap_or_else(|| panic!("{node}: not an array: {shown}"));
        let lww: Vec<_> = list.iter().filter(|c| c["rule"] == "lww").collect();
        if lww.is_empty() {
            continue;
        }
        listed.push(node);
        let price_conflict = lww
            .iter()
            .find(|c| c["column"] == "price" && c["table"] == "items")
            .unwrap_or_else(|| panic!("{node}: no conflict on items.price: {shown}{logs}"));
        let winner_text = price_conflict["winner"]["value"]
            .as_str()
            .unwrap_or_default();
        let loser_text = price_conflict["loser"]["value"]
            .as_str()
            .unwrap_or_default();
        let mut sides = [winner_text.to_owned(), loser_text.to_owned()];
        sides.sort();
        assert!(
            sides.iter().any(|s| s.contains("9.5")) && sides.iter().any(|s| s.contains("7.25")),
            "{node}: the conflict should be between 9.5 and 7.25 (winner {winner:?}): {shown}"
        );
        assert!(
            winner_text.contains(&winner.expect("price").to_string()),
            "{node}: the ledger's winner is not the price both replicas hold ({winner:?}): {shown}"
        );
    }
    assert!(
        !listed.is_empty(),
        "no ledger lists the lww conflict{}",
        cluster.logs()
    );

    // status still answers, now counting the conflict (on a node whose ledger holds it).
    let ledger_config = cluster.config(listed[0]).display().to_string();
    let status = cluster.cli_json(&["status", "-c", &ledger_config, "--json"]);
    let shown = serde_json::to_string_pretty(&status).expect("json");
    assert_eq!(status["running"], true, "{shown}");
    let items = status["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["table"] == "items"))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        items["conflicts"].as_u64().is_some_and(|n| n >= 1),
        "{shown}"
    );
    assert_eq!(items["rows"], 3, "{shown}");
}

#[test]
fn diff_and_reconcile_commands_find_and_repair_drift() {
    let cluster = Cluster::pair();
    let (a, b) = (cluster.db("a"), cluster.db("b"));
    insert_rows(&a, 1..=500, 5);
    cluster.converge(
        &["a", "b"],
        "the first rows",
        |db| Ok(count_and_stock(db)?.0 == 500),
        describe_counts,
    );
    let a_config = cluster.config("a").display().to_string();
    // the link may still be coming up: ask until it is there
    let started = Instant::now();
    let agreed = loop {
        let out = cluster.cli(&["diff", "-c", &a_config, "--peer", "b"]);
        if out.status.code() == Some(0) || started.elapsed() > CONVERGE_TIMEOUT {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = String::from_utf8_lossy(&agreed.stdout);
    assert_eq!(
        agreed.status.code(),
        Some(0),
        "{text}{}{}",
        String::from_utf8_lossy(&agreed.stderr),
        cluster.logs()
    );
    assert!(text.contains("in agreement"), "{text}");
    assert!(text.contains("not checked"), "{text}");

    // b's row 7 edited behind driftless's back (capture disabled in the same transaction)
    exec(
        &b,
        "BEGIN; DROP TRIGGER _driftless_upd_items; UPDATE items SET name = 'by hand' WHERE id = 7; COMMIT;",
    );
    let out = cluster.cli(&["diff", "-c", &a_config, "--peer", "b", "--local"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", cluster.logs());
    assert!(text.contains("0 here, 1 there"), "{text}");
    assert!(text.contains("differences found"), "{text}");
    assert!(text.contains("local check: 1000 rows read"), "{text}");
    assert_eq!(item(&b, 7).expect("row 7").0.as_deref(), Some("by hand"));

    let report = cluster.cli_json(&[
        "reconcile",
        "-c",
        &a_config,
        "--peer",
        "b",
        "--local",
        "--json",
    ]);
    let shown = serde_json::to_string_pretty(&report).expect("json");
    assert_eq!(report["tables"][0]["peer_restored"], 1, "{shown}");
    assert_eq!(report["local_check"], true, "{shown}");
    // SQLite's storage format 2 adopts the hand edit (docs/reconciliation.md): b captures it
    // as its own write, and it replicates to a
    assert_eq!(
        item(&b, 7).expect("row 7").0.as_deref(),
        Some("by hand"),
        "{shown}"
    );
    let started = Instant::now();
    while item(&a, 7).expect("row 7").0.as_deref() != Some("by hand") {
        assert!(started.elapsed() < CONVERGE_TIMEOUT, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = loop {
        let out = cluster.cli(&["diff", "-c", &a_config, "--peer", "b", "--local"]);
        if out.status.code() == Some(0) || started.elapsed() > CONVERGE_TIMEOUT {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // a peer that is not linked: a clear error and exit status 2 (1 means "differences")
    let out = cluster.cli(&["diff", "-c", &a_config, "--peer", "nobody"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not connected to peer nobody"), "{stderr}");
}
