//! Content digests of synced tables read straight from a SQLite file (read-only, without opening
//! it as a store): the same canonical digest the stores compute (`driftless_store::digest`), so
//! equal digests mean equal rows. Used by the quickstart and by tests to show convergence.

use driftless_core::{KeyPart, PrimaryKey, Value};
use driftless_store::digest::ContentDigest;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// One table's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    pub table: String,
    pub rows: u64,
    /// The first 8 bytes of the digest, in hex.
    pub digest: String,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

/// Digests of `tables` in the database at `path` (opened read-only).
pub fn table_digests(path: &Path, tables: &[&str]) -> rusqlite::Result<Vec<TableDigest>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
        let key_names: Vec<String> = keys.into_iter().map(|(_, k)| k).collect();
        let order = key_names
            .iter()
            .map(|k| quote(k))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = conn.prepare(&format!("SELECT * FROM {} ORDER BY {order}", quote(table)))?;
        let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
        let mut rows = stmt.query([])?;
        let mut digest = ContentDigest::new();
        while let Some(row) = rows.next()? {
            let mut parts = Vec::new();
            let mut cells = Vec::new();
            for (i, column) in columns.iter().enumerate() {
                let v = value(row.get_ref(i)?);
                if key_names.contains(column) {
                    parts.push(match v {
                        Value::Integer(i) => KeyPart::Integer(i),
                        Value::Text(t) => KeyPart::Text(t),
                        Value::Blob(b) => KeyPart::Blob(b),
                        _ => continue,
                    });
                } else {
                    cells.push((column.as_str(), v));
                }
            }
            // key columns were read in declaration order; the key needs primary-key order
            let mut ordered = Vec::with_capacity(parts.len());
            for name in &key_names {
                let position = columns
                    .iter()
                    .filter(|c| key_names.contains(c))
                    .position(|c| c == name);
                if let Some(p) = position.and_then(|p| parts.get(p)) {
                    ordered.push(p.clone());
                }
            }
            if let Ok(key) = PrimaryKey::from_parts(&ordered) {
                digest.add_row(&key, &cells);
            }
        }
        let (rows, hash) = digest.finish();
        out.push(TableDigest {
            table: (*table).to_owned(),
            rows,
            digest: hash.iter().take(8).map(|b| format!("{b:02x}")).collect(),
        });
    }
    Ok(out)
}
