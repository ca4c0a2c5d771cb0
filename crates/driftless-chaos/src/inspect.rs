//! Reading a replica straight from its SQLite file, never through driftless: the synced tables as
//! a canonical dump, the node's own changes from its `_driftless_log`, and the counters that say
//! whether replication is quiet (pending local writes, held changes, cursors, log head).

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
    /// `PRAGMA integrity_check`: "ok" when the file is sound.
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
pub fn probe(db: &Path) -> rusqlite::Result<Probe> {
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
        log_head: count(&conn, "SELECT coalesce(max(seq), 0) FROM _driftless_log")?,
        cursors,
    })
}

/// Reads the whole replica of node `node` (best done with the node stopped).
pub fn read_replica(db: &Path, node: NodeId) -> rusqlite::Result<Replica> {
    let conn = open(db)?;
    let mut replica = Replica {
        items: rows(&conn, "items")?,
        counters: rows(&conn, "counters")?,
        dead_letters: count(&conn, "SELECT count(*) FROM _driftless_dead_letters")?,
        held: count(&conn, "SELECT count(*) FROM _driftless_held")?,
        integrity: conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?,
        ..Replica::default()
    };
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut stmt = conn.prepare("SELECT change FROM _driftless_log ORDER BY seq")?;
    let mut query = stmt.query([])?;
    while let Some(row) = query.next()? {
        let bytes: Vec<u8> = row.get(0)?;
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
