//! The client workload: one writer thread per node, writing to the node's replica (its SQLite
//! file, or its PostgreSQL database through a real PostgreSQL connection) with plain SQL, as an
//! application would, and recording every operation with its outcome. Which operation comes next
//! is a pure function of the seed; what it did (ok, no row matched, failed, unknown) is observed.
//!
//! The same operations run on both kinds of replica: `INSERT OR IGNORE` is
//! `INSERT ... ON CONFLICT (id) DO NOTHING` in PostgreSQL, the rest is the same SQL.
//!
//! Every written text is unique (`"n{node}:{n}:{column}"`), so the checker can tell which write a
//! value came from and spot values no client wrote.

use crate::node::StoreSpec;
use crate::pg;
use crate::schema::{COLD_BASE, COLD_SPAN, COUNTER_ROWS, HOT_ITEMS};
use driftless_sim::Rng;
use rusqlite::{Connection, ErrorCode, params};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a client write waits for SQLite's write lock (a paused node may hold it).
const CLIENT_BUSY_TIMEOUT: Duration = Duration::from_millis(1_500);

/// PostgreSQL clients wait as long for a row or table lock (a paused node may hold one in an
/// open transaction: `lock_timeout`), and give up on any statement after `statement_timeout`.
/// Either error rolls the statement back, so its outcome is "failed", not "unknown".
const PG_SESSION: &str = "SET lock_timeout = '1500ms'; SET statement_timeout = '5s'";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `INSERT OR IGNORE` of a hot row (a re-insert after a delete starts a new life).
    Insert,
    Update,
    Delete,
    /// Insert of a row no one else ever writes.
    ColdInsert,
    /// `UPDATE counters SET counter = counter + delta`.
    Increment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed and changed a row.
    Ok,
    /// Committed but matched no row (update or delete of an absent row, insert of a present
    /// one): the write had no effect.
    NoEffect,
    /// SQLite reported an error that guarantees the statement had no effect (disk full, busy,
    /// locked, constraint), or PostgreSQL answered with an error (an autocommit statement that
    /// fails, at any point up to its commit, is rolled back).
    Failed(String),
    /// Any other error (e.g. a PostgreSQL connection that broke before the answer): it may or
    /// may not have been committed.
    Unknown(String),
}

/// One client operation and what came of it.
#[derive(Debug, Clone)]
pub struct ClientOp {
    pub node: usize,
    /// Sequence number of the operation at its node.
    pub n: u64,
    /// When it finished, in ms after the workload started.
    pub at_ms: u64,
    pub kind: OpKind,
    pub table: &'static str,
    pub key: i64,
    /// `(column, text)` written (items only).
    pub cells: Vec<(&'static str, String)>,
    /// The increment (counters only).
    pub delta: i64,
    pub outcome: Outcome,
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(db)?;
    conn.busy_timeout(CLIENT_BUSY_TIMEOUT)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
    Ok(conn)
}

fn classify(e: &rusqlite::Error) -> Outcome {
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DiskFull
            | ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::ConstraintViolation,
        ) => Outcome::Failed(e.to_string()),
        _ => Outcome::Unknown(e.to_string()),
    }
}

/// The next operation of `node`'s client (its outcome not yet known).
fn next_op(rng: &mut Rng, node: usize, n: u64, cold: &mut i64) -> ClientOp {
    let value = |column: &'static str| (column, format!("n{node}:{n}:{column}"));
    let roll = rng.below(100);
    let hot = rng.range(0, HOT_ITEMS as u64 - 1) as i64;
    let (kind, table, key, cells, delta) = if roll < 40 {
        let cells = match rng.below(3) {
            0 => vec![value("a")],
            1 => vec![value("b")],
            _ => vec![value("a"), value("b")],
        };
        (OpKind::Update, "items", hot, cells, 0)
    } else if roll < 50 {
        (
            OpKind::Insert,
            "items",
            hot,
            vec![value("a"), value("b")],
            0,
        )
    } else if roll < 58 {
        (OpKind::Delete, "items", hot, vec![], 0)
    } else if roll < 73 {
        *cold += 1;
        let key = COLD_BASE + node as i64 * COLD_SPAN + *cold;
        (
            OpKind::ColdInsert,
            "items",
            key,
            vec![value("a"), value("b")],
            0,
        )
    } else {
        let delta = rng.range(1, 10) as i64 - 3;
        let delta = if delta == 0 { 5 } else { delta };
        let key = rng.range(0, COUNTER_ROWS as u64 - 1) as i64;
        (OpKind::Increment, "counters", key, vec![], delta)
    };
    ClientOp {
        node,
        n,
        at_ms: 0,
        kind,
        table,
        key,
        cells,
        delta,
        outcome: Outcome::NoEffect,
    }
}

/// A PostgreSQL error with an answer from the server means the statement was rolled back; an
/// error without one (connection lost mid-statement) leaves the outcome unknown.
fn classify_pg(e: &postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(db) => Outcome::Failed(format!("{} (SQLSTATE {})", db.message(), db.code().code())),
        None => Outcome::Unknown(e.to_string()),
    }
}

fn open_pg(url: &str) -> Result<postgres::Client, postgres::Error> {
    let mut client = pg::connect(&format!(
        "{url} application_name={}",
        pg::CLIENT_APPLICATION_NAME
    ))?;
    client.batch_execute(PG_SESSION)?;
    Ok(client)
}

fn execute_pg(client: &mut postgres::Client, op: &ClientOp) -> Result<u64, postgres::Error> {
    let text = |column: &str| {
        op.cells
            .iter()
            .find(|(c, _)| *c == column)
            .map(|(_, v)| v.as_str())
    };
    match op.kind {
        OpKind::Insert | OpKind::ColdInsert => client.execute(
            "INSERT INTO items (id, a, b) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
            &[&op.key, &text("a"), &text("b")],
        ),
        OpKind::Update => match (text("a"), text("b")) {
            (Some(a), Some(b)) => client.execute(
                "UPDATE items SET a = $2, b = $3 WHERE id = $1",
                &[&op.key, &a, &b],
            ),
            (Some(a), None) => {
                client.execute("UPDATE items SET a = $2 WHERE id = $1", &[&op.key, &a])
            }
            (_, b) => client.execute("UPDATE items SET b = $2 WHERE id = $1", &[&op.key, &b]),
        },
        OpKind::Delete => client.execute("DELETE FROM items WHERE id = $1", &[&op.key]),
        OpKind::Increment => client.execute(
            "UPDATE counters SET counter = counter + $2 WHERE id = $1",
            &[&op.key, &op.delta],
        ),
    }
}

/// A client connection to either kind of replica.
enum ClientConn {
    Sqlite(Connection),
    Postgres(Box<postgres::Client>),
}

impl ClientConn {
    fn open(store: &StoreSpec) -> Result<ClientConn, String> {
        match store {
            StoreSpec::Sqlite(db) => open(db).map(ClientConn::Sqlite).map_err(|e| e.to_string()),
            StoreSpec::Postgres { url, .. } => open_pg(url)
                .map(|c| ClientConn::Postgres(Box::new(c)))
                .map_err(|e| e.to_string()),
        }
    }

    /// Runs `op` and says what came of it.
    fn run(&mut self, op: &ClientOp) -> Outcome {
        let result = match self {
            ClientConn::Sqlite(c) => execute(c, op).map(|n| n as u64).map_err(|e| classify(&e)),
            ClientConn::Postgres(c) => execute_pg(c, op).map_err(|e| classify_pg(&e)),
        };
        match result {
            Ok(0) => Outcome::NoEffect,
            Ok(_) => Outcome::Ok,
            Err(outcome) => outcome,
        }
    }
}

fn execute(conn: &Connection, op: &ClientOp) -> rusqlite::Result<usize> {
    let text = |column: &str| {
        op.cells
            .iter()
            .find(|(c, _)| *c == column)
            .map(|(_, v)| v.as_str())
    };
    match op.kind {
        OpKind::Insert | OpKind::ColdInsert => conn.execute(
            "INSERT OR IGNORE INTO items (id, a, b) VALUES (?1, ?2, ?3)",
            params![op.key, text("a"), text("b")],
        ),
        OpKind::Update => match (text("a"), text("b")) {
            (Some(a), Some(b)) => conn.execute(
                "UPDATE items SET a = ?2, b = ?3 WHERE id = ?1",
                params![op.key, a, b],
            ),
            (Some(a), None) => {
                conn.execute("UPDATE items SET a = ?2 WHERE id = ?1", params![op.key, a])
            }
            (_, b) => conn.execute("UPDATE items SET b = ?2 WHERE id = ?1", params![op.key, b]),
        },
        OpKind::Delete => conn.execute("DELETE FROM items WHERE id = ?1", params![op.key]),
        OpKind::Increment => conn.execute(
            "UPDATE counters SET counter = counter + ?2 WHERE id = ?1",
            params![op.key, op.delta],
        ),
    }
}

/// Writes to `store` as node `node`'s application until `stop` is set; returns every operation.
pub fn run_writer(
    node: usize,
    store: StoreSpec,
    seed: u64,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> Vec<ClientOp> {
    let mut rng = Rng::new(seed);
    let mut ops = Vec::new();
    let mut conn: Option<ClientConn> = None;
    let mut cold = 0;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let mut op = next_op(&mut rng, node, n, &mut cold);
        let pause_ms = rng.range(2, 15);
        let mut open_error = None;
        if conn.is_none() {
            conn = ClientConn::open(&store)
                .map_err(|e| open_error = Some(e))
                .ok();
        }
        op.outcome = match conn.as_mut() {
            // Nothing was sent: no effect.
            None => Outcome::Failed(format!(
                "cannot open the database: {}",
                open_error.unwrap_or_default()
            )),
            Some(c) => {
                let outcome = c.run(&op);
                if matches!(outcome, Outcome::Failed(_) | Outcome::Unknown(_)) {
                    conn = None; // start over with a fresh connection after any error
                }
                outcome
            }
        };
        op.at_ms = started.elapsed().as_millis() as u64;
        ops.push(op);
        std::thread::sleep(Duration::from_millis(pause_ms));
    }
    ops
}
