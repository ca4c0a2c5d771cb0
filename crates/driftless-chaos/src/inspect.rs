//! Reading a replica straight from its SQLite file or PostgreSQL database, never through
//! driftless: the synced tables as a canonical dump, the node's own changes from its change
//! history (SQLite: `_driftless_history`, which the harness's test build keeps because storage
//! format 2 stores only each row's latest state; PostgreSQL: `driftless.history`, likewise),
//! and the counters
//! that say whether replication is quiet (pending local writes, held changes, cursors, log head).
//!
//! Both kinds are read into the same [`Replica`], cell values as driftless values
//! (`bigint`/`INTEGER` as `Integer`, `text`/`TEXT` as `Text`, docs/postgres.md "Types"), so the
//! checker compares replicas of different kinds cell by cell.

use crate::node::StoreSpec;
use crate::pg;
use driftless_core::codec::decode_change;
use driftless_core::{Change, KeyPart, NodeId, Value};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

/// A row of a synced table: primary key and the other columns in declaration order.
pub type Rows = BTreeMap<i64, Vec<Value>>;

/// Everything the checker needs from one replica.
#[derive(Debug, Clone, Default)]
pub struct Replica {
    pub items: Rows,
    pub counters: Rows,
    /// Log entries whose origin is this node (its captured client writes), in log order.
    pub local_changes: Vec<Change>,
    /// Log entries identical, byte for byte, to an earlier entry: a change applied twice.
    pub duplicate_log_entries: u64,
    pub log_entries: u64,
    pub undecodable_log_entries: u64,
    pub dead_letters: u64,
    pub held: u64,
    /// "ok" when the replica is sound: SQLite's `PRAGMA integrity_check`; for PostgreSQL,
    /// `amcheck` (every B-tree index of the synced tables and driftless's schema checked against
    /// its heap, every heap verified) when the extension could be installed.
    pub integrity: String,
}

/// The replication counters of one replica.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Probe {
    pub pending: u64,
    pub held: u64,
    pub log_head: u64,
    /// How far this replica has applied each sender's log.
    pub cursors: BTreeMap<NodeId, u64>,
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

fn to_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn count(conn: &Connection, sql: &str) -> rusqlite::Result<u64> {
    conn.query_row(sql, [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

fn rows(conn: &Connection, table: &str) -> rusqlite::Result<Rows> {
    let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY 1"))?;
    let columns = stmt.column_count();
    let mut out = Rows::new();
    let mut query = stmt.query([])?;
    while let Some(row) = query.next()? {
        let key: i64 = row.get(0)?;
        let values = (1..columns)
            .map(|i| row.get_ref(i).map(to_value))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        out.insert(key, values);
    }
    Ok(out)
}

/// The replication counters, read while the node runs.
pub fn probe(store: &StoreSpec) -> Result<Probe, String> {
    match store {
        StoreSpec::Sqlite(db) => probe_sqlite(db).map_err(|e| e.to_string()),
        StoreSpec::Postgres { url, .. } => probe_postgres(url).map_err(|e| e.to_string()),
    }
}

/// Reads the whole replica of node `node` (best done with the node stopped).
pub fn read_replica(store: &StoreSpec, node: NodeId) -> Result<Replica, String> {
    match store {
        StoreSpec::Sqlite(db) => read_sqlite(db, node).map_err(|e| e.to_string()),
        StoreSpec::Postgres { url, .. } => read_postgres(url, node),
    }
}

/// `(items, counters)` row counts (to see the initial rows arrive).
pub fn row_counts(store: &StoreSpec) -> Result<(u64, u64), String> {
    match store {
        StoreSpec::Sqlite(db) => {
            let conn = open(db).map_err(|e| e.to_string())?;
            Ok((
                count(&conn, "SELECT count(*) FROM items").map_err(|e| e.to_string())?,
                count(&conn, "SELECT count(*) FROM counters").map_err(|e| e.to_string())?,
            ))
        }
        StoreSpec::Postgres { url, .. } => {
            let mut client = pg::connect(url).map_err(|e| e.to_string())?;
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM public.items), (SELECT count(*) FROM public.counters)",
                    &[],
                )
                .map_err(|e| e.to_string())?;
            Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
        }
    }
}

fn probe_sqlite(db: &Path) -> rusqlite::Result<Probe> {
    let conn = open(db)?;
    let mut cursors = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT peer, seq FROM _driftless_cursors")?;
    let mut query = stmt.query([])?;
    while let Some(row) = query.next()? {
        let peer: Vec<u8> = row.get(0)?;
        let seq: i64 = row.get(1)?;
        if let Ok(bytes) = <[u8; 16]>::try_from(peer.as_slice()) {
            cursors.insert(NodeId::from_bytes(bytes), seq as u64);
        }
    }
    Ok(Probe {
        pending: count(&conn, "SELECT count(*) FROM _driftless_pending")?,
        held: count(&conn, "SELECT count(*) FROM _driftless_held")?,
        log_head: count(&conn, "SELECT coalesce(max(seq), 0) FROM _driftless_rows")?,
        cursors,
    })
}

fn read_sqlite(db: &Path, node: NodeId) -> rusqlite::Result<Replica> {
    let conn = open(db)?;
    let mut replica = Replica {
        items: rows(&conn, "items")?,
        counters: rows(&conn, "counters")?,
        dead_letters: count(&conn, "SELECT count(*) FROM _driftless_dead_letters")?,
        held: count(&conn, "SELECT count(*) FROM _driftless_held")?,
        integrity: conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?,
        ..Replica::default()
    };
    let mut entries = Vec::new();
    let has_history: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = '_driftless_history'",
        [],
        |r| r.get(0),
    )?;
    if has_history > 0 {
        let mut stmt = conn.prepare("SELECT change FROM _driftless_history ORDER BY seq")?;
        let mut query = stmt.query([])?;
        while let Some(row) = query.next()? {
            entries.push(row.get::<_, Vec<u8>>(0)?);
        }
    }
    add_log(&mut replica, entries, node);
    Ok(replica)
}

/// Decodes log entries (in log order) into the replica's own changes and duplicate counts.
fn add_log(replica: &mut Replica, entries: Vec<Vec<u8>>, node: NodeId) {
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for bytes in entries {
        replica.log_entries += 1;
        match decode_change(&bytes) {
            Ok(change) => {
                if change.origin() == node {
                    replica.local_changes.push(change);
                }
            }
            Err(_) => replica.undecodable_log_entries += 1,
        }
        if !seen.insert(bytes) {
            replica.duplicate_log_entries += 1;
        }
    }
}

/// driftless's schema in a chaos PostgreSQL replica (the adapter's default).
const DRIFTLESS_SCHEMA: &str = "driftless";

fn pg_count(client: &mut postgres::Client, sql: &str) -> Result<u64, postgres::Error> {
    Ok(client.query_one(sql, &[])?.get::<_, i64>(0) as u64)
}

fn probe_postgres(url: &str) -> Result<Probe, postgres::Error> {
    let mut client = pg::connect(url)?;
    let ds = DRIFTLESS_SCHEMA;
    let mut cursors = BTreeMap::new();
    for row in client.query(&format!("SELECT peer, seq FROM {ds}.cursors"), &[])? {
        let peer: Vec<u8> = row.get(0);
        let seq: i64 = row.get(1);
        if let Ok(bytes) = <[u8; 16]>::try_from(peer.as_slice()) {
            cursors.insert(NodeId::from_bytes(bytes), seq as u64);
        }
    }
    Ok(Probe {
        pending: pg_count(&mut client, &format!("SELECT count(*) FROM {ds}.pending"))?,
        held: pg_count(&mut client, &format!("SELECT count(*) FROM {ds}.held"))?,
        log_head: pg_count(
            &mut client,
            &format!("SELECT coalesce(max(seq), 0) FROM {ds}.rows"),
        )?,
        cursors,
    })
}

/// A cell of a PostgreSQL row as a driftless value, for the column types the chaos schema uses
/// (and their close relatives, so a schema change shows up as a clear error, not a wrong value).
fn pg_value(row: &postgres::Row, i: usize) -> Result<Value, String> {
    use postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    let err = |e: postgres::Error| format!("column {i}: {e}");
    Ok(match ty {
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(err)?
            .map_or(Value::Null, Value::Integer),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(err)?
            .map_or(Value::Null, |v| Value::Integer(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(err)?
            .map_or(Value::Null, |v| Value::Integer(v.into())),
        Type::TEXT | Type::VARCHAR => row
            .try_get::<_, Option<String>>(i)
            .map_err(err)?
            .map_or(Value::Null, Value::Text),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(i)
            .map_err(err)?
            .map_or(Value::Null, Value::Real),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)
            .map_err(err)?
            .map_or(Value::Null, Value::Blob),
        other => {
            return Err(format!(
                "column {:?} has type {other}, which the chaos schema does not use",
                row.columns()[i].name()
            ));
        }
    })
}

fn pg_rows(client: &mut postgres::Client, table: &str) -> Result<Rows, String> {
    let rows = client
        .query(&format!("SELECT * FROM public.\"{table}\" ORDER BY 1"), &[])
        .map_err(|e| format!("read {table}: {e}"))?;
    let mut out = Rows::new();
    for row in &rows {
        let key: i64 = row.try_get(0).map_err(|e| format!("{table} key: {e}"))?;
        let values = (1..row.len())
            .map(|i| pg_value(row, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{table}({key}): {e}"))?;
        out.insert(key, values);
    }
    Ok(out)
}

/// `amcheck` over the replica: every B-tree index of the synced tables and of driftless's schema
/// (checked against its heap: every row indexed) and every heap of those tables. "ok" when
/// nothing is reported, or when `amcheck` is not installed in the database (the history notes
/// that when it creates the database).
fn pg_integrity(client: &mut postgres::Client) -> Result<String, postgres::Error> {
    let installed = pg_count(
        client,
        "SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'",
    )?;
    if installed == 0 {
        return Ok("ok".into());
    }
    let scope = format!("n.nspname IN ('public', '{DRIFTLESS_SCHEMA}')");
    let mut problems = Vec::new();
    let indexes = client.query(
        &format!(
            "SELECT c.oid, c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid              JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am a ON a.oid = c.relam              WHERE a.amname = 'btree' AND {scope}"
        ),
        &[],
    )?;
    for row in &indexes {
        let (oid, name): (postgres::types::Oid, String) = (row.get(0), row.get(1));
        if let Err(e) = client.execute("SELECT bt_index_check($1::oid::regclass, true)", &[&oid]) {
            problems.push(format!("index {name}: {e}"));
        }
    }
    let heaps = client.query(
        &format!(
            "SELECT c.relname::text, v.msg FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,              LATERAL verify_heapam(c.oid) v WHERE c.relkind = 'r' AND {scope}"
        ),
        &[],
    )?;
    for row in &heaps {
        let (table, msg): (String, Option<String>) = (row.get(0), row.get(1));
        problems.push(format!("heap {table}: {}", msg.unwrap_or_default()));
    }
    Ok(if problems.is_empty() {
        "ok".into()
    } else {
        problems.join("; ")
    })
}

fn read_postgres(url: &str, node: NodeId) -> Result<Replica, String> {
    let mut client = pg::connect(url).map_err(|e| format!("connect: {e}"))?;
    let ds = DRIFTLESS_SCHEMA;
    let counted = |client: &mut postgres::Client, sql: &str| {
        pg_count(client, sql).map_err(|e| format!("{sql}: {e}"))
    };
    let mut replica = Replica {
        items: pg_rows(&mut client, "items")?,
        counters: pg_rows(&mut client, "counters")?,
        dead_letters: counted(
            &mut client,
            &format!("SELECT count(*) FROM {ds}.dead_letters"),
        )?,
        held: counted(&mut client, &format!("SELECT count(*) FROM {ds}.held"))?,
        integrity: pg_integrity(&mut client).map_err(|e| format!("amcheck: {e}"))?,
        ..Replica::default()
    };
    // (no table: the node never changed anything, or it is not the harness's test build)
    let kept: bool = client
        .query_one(
            &format!("SELECT pg_catalog.to_regclass('{ds}.history') IS NOT NULL"),
            &[],
        )
        .map_err(|e| format!("look for {ds}.history: {e}"))?
        .get(0);
    let sql = if kept {
        format!("SELECT change FROM {ds}.history ORDER BY seq")
    } else {
        "SELECT NULL::bytea WHERE false".to_owned()
    };
    let entries = client
        .query(&sql, &[])
        .map_err(|e| format!("read {ds}.history: {e}"))?
        .iter()
        .map(|row| row.get::<_, Vec<u8>>(0))
        .collect();
    add_log(&mut replica, entries, node);
    Ok(replica)
}

fn render(out: &mut String, table: &str, rows: &Rows) {
    for (key, values) in rows {
        out.push_str(table);
        out.push('|');
        out.push_str(&key.to_string());
        for v in values {
            out.push('|');
            out.push_str(&format!("{v:?}"));
        }
        out.push('\n');
    }
}

/// The canonical dump of the synced tables: equal dumps mean equal tables.
pub fn dump(replica: &Replica) -> String {
    let mut out = String::new();
    render(&mut out, "items", &replica.items);
    render(&mut out, "counters", &replica.counters);
    out
}

/// The integer primary key of a change (every synced table here has one).
pub fn integer_key(change: &Change) -> Option<i64> {
    match change.key.parts().as_slice() {
        [KeyPart::Integer(k)] => Some(*k),
        _ => None,
    }
}

/// The tables every chaos node syncs (checked against the config text, so they stay in step).
pub const SYNCED_TABLES: [&str; 2] = ["items", "counters"];

/// The node's own metrics (admin `/metrics`), summed over labels by name. Counters restart from
/// zero when the process does, so these are lower bounds. `None` if the node does not answer.
pub fn scrape_metrics(admin: std::net::SocketAddr) -> Option<BTreeMap<String, f64>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    let mut sums = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("driftless_")) {
        let mut parts = line.rsplitn(2, ' ');
        let (Some(value), Some(series)) = (parts.next(), parts.next()) else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if let Ok(value) = value.trim().parse::<f64>() {
            *sums.entry(name.to_owned()).or_insert(0.0) += value;
        }
    }
    Some(sums)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_synced_tables_are_the_configured_ones() {
        for table in super::SYNCED_TABLES {
            assert!(crate::schema::TABLES_TOML.contains(&format!("name = \"{table}\"")));
        }
    }
}
