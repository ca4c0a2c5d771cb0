//! `driftless quickstart`: three SQLite replicas on this machine, synced in a full mesh, shown
//! converging through concurrent conflicting writes and a node cut off and healed.

use crate::config::Config;
use crate::digest::{TableDigest, table_digests};
use crate::node::{Listeners, run};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const TABLES: [&str; 2] = ["items", "notes"];
const MARKER: &str = ".driftless-quickstart";
/// How long the replicas get to converge after each step.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS items (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        price REAL,
        stock INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, body TEXT);
";

/// Errors of the quickstart.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error("{0} exists and was not made by the quickstart; choose another --dir")]
    NotOurs(PathBuf),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("node {name}: {source}")]
    Node {
        name: String,
        source: Box<crate::node::NodeError>,
    },
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), crate::node::NodeError>>,
}

/// The outcome: whether every replica ended identical.
#[derive(Debug)]
pub struct QuickstartReport {
    pub converged: bool,
    pub digests: Vec<(String, Vec<TableDigest>)>,
}

fn say(text: &str) {
    println!("{text}");
}

fn db_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.db"))
}

fn config_text(node: &str, port: u16, peers: &[(&str, u16)]) -> String {
    let mut text = format!(
        "# written by `driftless quickstart`\n[node]\nname = \"{node}\"\ndata_dir = \"./{node}\"\n\n\
         [store]\nkind = \"sqlite\"\npath = \"./{node}.db\"\n\n\
         [[tables]]\nname = \"items\"\ncolumns = {{ stock = \"counter\" }}\n\n\
         [[tables]]\nname = \"notes\"\n\n\
         [listen]\naddr = \"127.0.0.1:{port}\"\ninsecure = true\n\n\
         [sync]\nheartbeat_ms = 500\nreconnect_max_ms = 1000\n"
    );
    for (peer, peer_port) in peers {
        text.push_str(&format!(
            "\n[[peers]]\nname = \"{peer}\"\naddr = \"127.0.0.1:{peer_port}\"\ninsecure = true\n"
        ));
    }
    text
}

async fn start(dir: &Path, node: &str, listener: TcpListener) -> Result<Running, QuickstartError> {
    let config = Config::load(&dir.join(format!("{node}.toml")))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = Listeners {
        peers: Some(listener),
        admin: None,
    };
    let task = tokio::spawn(run(config, listeners, async move {
        let _ = stopped.await;
    }));
    Ok(Running { stop, task })
}

async fn stop(name: &str, running: Running) -> Result<(), QuickstartError> {
    let _ = running.stop.send(());
    match running.task.await {
        Ok(result) => result.map_err(|source| QuickstartError::Node {
            name: name.into(),
            source: Box::new(source),
        }),
        Err(e) => Err(QuickstartError::Io(std::io::Error::other(e))),
    }
}

fn write(dir: &Path, node: &str, sql: &str) -> Result<(), QuickstartError> {
    let conn = Connection::open(db_path(dir, node))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(sql)?;
    Ok(())
}

fn digests(dir: &Path, nodes: &[&str]) -> Result<Vec<(String, Vec<TableDigest>)>, QuickstartError> {
    nodes
        .iter()
        .map(|n| Ok(((*n).to_owned(), table_digests(&db_path(dir, n), &TABLES)?)))
        .collect()
}

/// Waits until the given replicas hold identical tables; returns the time it took.
async fn converge(dir: &Path, nodes: &[&str]) -> Result<Option<Duration>, QuickstartError> {
    let started = Instant::now();
    while started.elapsed() < CONVERGE_TIMEOUT {
        let all = digests(dir, nodes)?;
        if all.windows(2).all(|w| w[0].1 == w[1].1) {
            return Ok(Some(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

fn print_digests(all: &[(String, Vec<TableDigest>)]) {
    for (node, tables) in all {
        let shown: Vec<String> = tables
            .iter()
            .map(|t| format!("{} {} rows {}", t.table, t.rows, t.digest))
            .collect();
        say(&format!("    {node}: {}", shown.join("   ")));
    }
}

fn prepare_dir(dir: &Path) -> Result<(), QuickstartError> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        if !dir.join(MARKER).exists() {
            return Err(QuickstartError::NotOurs(dir.to_path_buf()));
        }
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(MARKER),
        "made by driftless quickstart; safe to delete\n",
    )?;
    Ok(())
}

/// Runs the demo. With `once`, returns after the demo; otherwise keeps the nodes running until
/// `forever` completes (Ctrl-C), printing changes as they converge.
pub async fn quickstart(
    dir: &Path,
    once: bool,
    forever: impl std::future::Future<Output = ()>,
) -> Result<QuickstartReport, QuickstartError> {
    prepare_dir(dir)?;
    let dir = &std::fs::canonicalize(dir)?;
    say(&format!("driftless quickstart in {}", dir.display()));

    say("\n[1/6] creating three SQLite replicas with a sample schema (items, notes)");
    let mut listeners = Vec::new();
    for node in NODES {
        write(dir, node, SCHEMA)?;
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    // full mesh: a dials b and c, b dials c
    for (i, node) in NODES.iter().enumerate() {
        let peers: Vec<(&str, u16)> = (i + 1..NODES.len()).map(|j| (NODES[j], ports[j])).collect();
        std::fs::write(
            dir.join(format!("{node}.toml")),
            config_text(node, ports[i], &peers),
        )?;
        say(&format!(
            "    {node}: {}  (config {node}.toml, peers on 127.0.0.1:{})",
            db_path(dir, node).display(),
            ports[i]
        ));
    }

    say("\n[2/6] starting three nodes in a full mesh");
    let mut running = Vec::new();
    for (node, listener) in NODES.iter().zip(listeners) {
        running.push(Some(start(dir, node, listener).await?));
    }
    write(
        dir,
        "node-a",
        "INSERT INTO items (id, name, price, stock) VALUES
            (1, 'tea', 2.0, 10), (2, 'coffee', 3.5, 10), (3, 'cocoa', 4.0, 10), (4, 'chai', 3.0, 10);
         INSERT INTO notes VALUES ('welcome', 'written on node-a');",
    )?;
    say("    node-a inserted 4 items and a note");
    report_convergence(dir, &NODES).await?;

    say("\n[3/6] concurrent writes on all three nodes, including conflicting ones");
    write(
        dir,
        "node-a",
        "UPDATE items SET price = 2.5 WHERE id = 1; UPDATE items SET stock = stock - 1 WHERE id = 2;",
    )?;
    write(
        dir,
        "node-b",
        "UPDATE items SET price = 2.75 WHERE id = 1; UPDATE items SET stock = stock - 2 WHERE id = 2;",
    )?;
    write(
        dir,
        "node-c",
        "UPDATE items SET name = 'green tea' WHERE id = 1; UPDATE items SET stock = stock - 3 WHERE id = 2;",
    )?;
    say("    a and b both set the price of tea (a conflict: the later write wins everywhere)");
    say("    c renamed tea (another column: both edits survive)");
    say("    a, b and c sold 1, 2 and 3 coffees (stock is a counter: 10 - 6 = 4 everywhere)");
    report_convergence(dir, &NODES).await?;

    say("\n[4/6] cutting node-c off and writing on both sides");
    let c = running[2].take().expect("running");
    stop("node-c", c).await?;
    write(
        dir,
        "node-a",
        "DELETE FROM items WHERE id = 3; INSERT INTO notes VALUES ('cut', 'written while c was away');",
    )?;
    write(dir, "node-b", "UPDATE items SET price = 3.25 WHERE id = 4;")?;
    write(
        dir,
        "node-c",
        "UPDATE items SET stock = stock + 5 WHERE id = 4; INSERT INTO items (id, name, price, stock) VALUES (5, 'mate', 3.8, 7);",
    )?;
    say("    a deleted cocoa and added a note, b repriced chai");
    say("    c, offline, restocked chai and added mate to its own file");
    report_convergence(dir, &NODES[..2]).await?;

    say("\n[5/6] healing: restarting node-c");
    let listener = TcpListener::bind(("127.0.0.1", ports[2])).await?;
    running[2] = Some(start(dir, "node-c", listener).await?);
    let converged = report_convergence(dir, &NODES).await?;

    say("\n[6/6] result");
    let all = digests(dir, &NODES)?;
    print_digests(&all);
    let tea: (String, f64, i64) = Connection::open(db_path(dir, "node-c"))?.query_row(
        "SELECT name, price, (SELECT stock FROM items WHERE id = 2) FROM items WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    say(&format!(
        "    item 1 is now {:?} at {} (price from the later of a and b, name from c); coffee stock {}",
        tea.0, tea.1, tea.2
    ));
    if converged {
        say("    all replicas converged: identical digests on every node");
    } else {
        say("    NOT converged: the digests differ (see the node logs)");
    }

    if !once {
        say(&format!(
            "\nThe nodes keep running. Write to any replica with the sqlite3 shell and watch it arrive, e.g.\n    \
             sqlite3 {} \"UPDATE items SET price = 9 WHERE id = 1\"\n\
             Press Ctrl-C to stop.",
            db_path(dir, "node-b").display()
        ));
        tokio::pin!(forever);
        let mut last = all.clone();
        loop {
            tokio::select! {
                _ = &mut forever => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    let now = digests(dir, &NODES)?;
                    if now != last {
                        if now.windows(2).all(|w| w[0].1 == w[1].1) {
                            say("change arrived everywhere:");
                            print_digests(&now);
                        }
                        last = now;
                    }
                }
            }
        }
    }
    for (node, r) in NODES.iter().zip(running) {
        if let Some(r) = r {
            stop(node, r).await?;
        }
    }
    Ok(QuickstartReport {
        converged,
        digests: all,
    })
}

async fn report_convergence(dir: &Path, nodes: &[&str]) -> Result<bool, QuickstartError> {
    match converge(dir, nodes).await? {
        Some(took) => {
            say(&format!("    converged in {} ms:", took.as_millis()));
            print_digests(&digests(dir, nodes)?);
            Ok(true)
        }
        None => {
            say(&format!("    not converged after {CONVERGE_TIMEOUT:?}:"));
            print_digests(&digests(dir, nodes)?);
            Ok(false)
        }
    }
}
