//! Content digests of synced tables, read straight from a SQLite file: equal digests mean equal
//! rows. Used by the quickstart and tests to show convergence.

use driftless_core::Value;
use driftless_core::codec::Encoder;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// One table's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    pub table: String,
    pub rows: u64,
    /// BLAKE3 of every row in primary-key order, first 16 hex digits.
    pub digest: String,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Digests of `tables` in the database at `path` (opened read-only).
pub fn table_digests(path: &Path, tables: &[&str]) -> rusqlite::Result<Vec<TableDigest>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(table_digests_raw(&conn, tables)?
        .into_iter()
        .map(|(table, rows, digest)| TableDigest {
            table,
            rows,
            digest: hex(&digest),
        })
        .collect())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// `(table, rows, 16-byte digest)` of each table, read through `conn`.
pub fn table_digests_raw(
    conn: &Connection,
    tables: &[&str],
) -> rusqlite::Result<Vec<(String, u64, [u8; 16])>> {
    let mut out = Vec::new();
    for table in tables {
        let mut info = conn.prepare(&format!("PRAGMA table_info({})", quote(table)))?;
        let mut keys: Vec<(i64, String)> = info
            .query_map([], |r| Ok((r.get::<_, i64>(5)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|(pk, _)| *pk > 0)
            .collect();
        keys.sort();
        let order = keys
            .iter()
            .map(|(_, k)| quote(k))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = conn.prepare(&format!("SELECT * FROM {} ORDER BY {order}", quote(table)))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        let mut hasher = blake3::Hasher::new();
        let mut count = 0;
        while let Some(row) = rows.next()? {
            let mut e = Encoder::new();
            for i in 0..columns {
                let value = match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Integer(v),
                    ValueRef::Real(v) => Value::Real(v),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                };
                e.value(&value);
            }
            hasher.update(&e.finish());
            count += 1;
        }
        let digest: [u8; 16] = hasher.finalize().as_bytes()[..16]
            .try_into()
            .expect("16 of 32 bytes");
        out.push(((*table).to_owned(), count, digest));
    }
    Ok(out)
}
