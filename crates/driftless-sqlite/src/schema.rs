//! Introspection of synced tables and the capture triggers installed on them.

use crate::meta::KEY_COLUMNS_MAX;
use driftless_core::{ColumnKind, ColumnName, SchemaFingerprint, TableRules};
use driftless_store::{ColumnSchema, StoreError, TableConfig, TableSchema};
use rusqlite::Connection;

/// `"name"` with embedded quotes doubled: every identifier reaches SQL through this.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn schema_error(table: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Schema {
        table: table.to_owned(),
        reason: reason.into(),
    }
}

/// Reads a table's columns and checks it can be synced.
pub fn introspect(conn: &Connection, config: &TableConfig) -> Result<TableSchema, StoreError> {
    let name = config.name.as_str();
    if name.starts_with("_driftless_") {
        return Err(schema_error(
            name,
            "tables named _driftless_* are driftless's own",
        ));
    }
    let kind: Option<String> = conn
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1 AND type IN ('table', 'view')",
            [name],
            |r| r.get(0),
        )
        .ok();
    match kind.as_deref() {
        Some("table") => {}
        Some(other) => return Err(schema_error(name, format!("is a {other}, not a table"))),
        None => return Err(schema_error(name, "no such table in the database")),
    }
    let mut stmt = conn
        .prepare(&format!("PRAGMA table_xinfo({})", quote_ident(name)))
        .map_err(db)?;
    let mut columns = Vec::new();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .map_err(db)?;
    for row in rows {
        let (column, declared_type, not_null, pk, hidden) = row.map_err(db)?;
        if hidden != 0 {
            // generated columns are computed by SQLite on every replica; never synced
            continue;
        }
        let column_name = ColumnName::new(&column)
            .map_err(|e| schema_error(name, format!("column {column:?}: {e}")))?;
        columns.push(ColumnSchema {
            name: column_name,
            declared_type,
            kind: ColumnKind::Lww,
            primary_key: (pk > 0).then(|| (pk - 1) as usize),
            not_null: not_null != 0,
        });
    }
    let key_count = columns.iter().filter(|c| c.primary_key.is_some()).count();
    if key_count == 0 {
        return Err(schema_error(
            name,
            "has no PRIMARY KEY; driftless identifies rows across replicas by primary key, \
             so add one (e.g. `id INTEGER PRIMARY KEY`)",
        ));
    }
    if key_count > KEY_COLUMNS_MAX {
        return Err(schema_error(
            name,
            format!("primary key has {key_count} columns; the limit is {KEY_COLUMNS_MAX}"),
        ));
    }
    let mut rules = TableRules::new().with_priority(config.priority.iter().copied());
    for (column, kind) in &config.column_kinds {
        let Some(schema) = columns.iter_mut().find(|c| &c.name == column) else {
            return Err(schema_error(
                name,
                format!("configured column {column} ({kind}) does not exist"),
            ));
        };
        if schema.primary_key.is_some() {
            return Err(schema_error(
                name,
                format!("column {column} is part of the primary key and cannot be a {kind}"),
            ));
        }
        schema.kind = *kind;
        rules = rules.with_column(column.clone(), *kind);
    }
    let fingerprint = SchemaFingerprint::compute(
        &config.name,
        columns
            .iter()
            .map(|c| (c.name.as_str(), c.primary_key, c.kind.as_str())),
    );
    Ok(TableSchema {
        name: config.name.clone(),
        columns,
        rules,
        fingerprint,
    })
}

/// Operation codes recorded by the triggers.
pub const OP_INSERT: i64 = 1;
pub const OP_UPDATE: i64 = 2;
pub const OP_DELETE: i64 = 3;
/// A row that a write may have deleted through a UNIQUE conflict (`INSERT OR REPLACE`): stamping
/// looks at whether it still exists.
pub const OP_CHECK: i64 = 4;

/// Bit of the changed-columns mask that a value column with stable id `id` sets: one bit per
/// column for the first 63, the last bit shared by all the others (then all of those count as
/// changed).
pub fn mask_bit(id: u32) -> u32 {
    id.min(63)
}

/// The three capture triggers of a table as `(name, CREATE TRIGGER statement)`. Each records the
/// table id, the operation and the primary key, and an update also which columns it changed (a
/// mask over the columns' stable ids, from `OLD.c IS NOT NEW.c`): storage format 2 keeps no copy
/// of the values to compare with, so the trigger is the one place that still sees the old row.
/// Values are read from the table when the write is stamped. No `WHEN` clause: a condition
/// evaluated on every user write measurably slows bulk inserts, so driftless instead removes the
/// records of its own writes inside its own transactions (see `SqliteStore::write_tx`).
pub fn trigger_sql(schema: &TableSchema, id: i64, column_ids: &[u32]) -> [(String, String); 3] {
    let table = schema.name.as_str();
    let qtable = quote_ident(table);
    let keys = schema.key_columns();
    let target: String = (0..keys.len()).map(|i| format!(", k{i}")).collect();
    let of = |prefix: &str| -> String {
        keys.iter()
            .map(|c| format!(", {prefix}.{}", quote_ident(c.name.as_str())))
            .collect()
    };
    let (new, old) = (of("NEW"), of("OLD"));
    let key_changed = keys
        .iter()
        .map(|c| {
            let q = quote_ident(c.name.as_str());
            format!("OLD.{q} IS NOT NEW.{q}")
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    let mask_terms: Vec<String> = schema
        .value_columns()
        .zip(column_ids)
        .map(|(c, id)| {
            let q = quote_ident(c.name.as_str());
            format!("((OLD.{q} IS NOT NEW.{q}) << {})", mask_bit(*id))
        })
        .collect();
    let mask = if mask_terms.is_empty() {
        "0".to_owned()
    } else {
        mask_terms.join(" | ")
    };
    let name = |op: &str| format!("_driftless_{op}_{table}");
    [
        (
            name("ins"),
            format!(
                "CREATE TRIGGER {} AFTER INSERT ON {qtable} BEGIN \
                 INSERT INTO _driftless_pending (tbl, op{target}) VALUES ({id}, {OP_INSERT}{new}); END",
                quote_ident(&name("ins"))
            ),
        ),
        (
            name("upd"),
            format!(
                "CREATE TRIGGER {} AFTER UPDATE ON {qtable} BEGIN \
                 INSERT INTO _driftless_pending (tbl, op{target}) \
                 SELECT {id}, {OP_DELETE}{old} WHERE {key_changed}; \
                 INSERT INTO _driftless_pending (tbl, op, cols{target}) VALUES ({id}, {OP_UPDATE}, {mask}{new}); END",
                quote_ident(&name("upd"))
            ),
        ),
        (
            name("del"),
            format!(
                "CREATE TRIGGER {} AFTER DELETE ON {qtable} BEGIN \
                 INSERT INTO _driftless_pending (tbl, op{target}) VALUES ({id}, {OP_DELETE}{old}); END",
                quote_ident(&name("del"))
            ),
        ),
    ]
}

/// The UNIQUE indexes of a table other than its primary key, as column lists. Indexes on
/// expressions are left out (their conflicts cannot be named by column); see docs/sqlite.md.
fn unique_indexes(conn: &Connection, table: &str) -> Result<Vec<Vec<String>>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1 AND origin != 'pk'")
        .map_err(db)?;
    let names: Vec<String> = stmt
        .query_map([table], |r| r.get(0))
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    let mut out = Vec::new();
    for index in names {
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
            .map_err(db)?;
        let columns: Vec<Option<String>> = stmt
            .query_map([&index], |r| r.get(0))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?;
        if let Some(columns) = columns.into_iter().collect::<Option<Vec<String>>>() {
            out.push(columns);
        }
    }
    Ok(out)
}

/// For a table with UNIQUE indexes besides its key: triggers that record, before each insert or
/// update, the rows whose unique values the new row takes. `INSERT OR REPLACE` deletes such rows
/// without firing delete triggers (unless the writer enabled `recursive_triggers`), so their
/// deletion would otherwise never be captured. A recorded row that was not deleted (the write
/// was an `OR IGNORE`, or failed) stamps as nothing.
fn replace_trigger_sql(
    schema: &TableSchema,
    id: i64,
    unique: &[Vec<String>],
) -> Vec<(String, String)> {
    if unique.is_empty() {
        return Vec::new();
    }
    let table = schema.name.as_str();
    let qtable = quote_ident(table);
    let keys = schema.key_columns();
    let target: String = (0..keys.len()).map(|i| format!(", k{i}")).collect();
    let key_cols: String = keys
        .iter()
        .map(|c| format!(", t.{}", quote_ident(c.name.as_str())))
        .collect();
    let same_key = |row: &str| -> String {
        keys.iter()
            .map(|c| {
                let q = quote_ident(c.name.as_str());
                format!("t.{q} IS {row}.{q}")
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let body = |row: &str| -> String {
        unique
            .iter()
            .map(|columns| {
                let matches = columns
                    .iter()
                    .map(|c| {
                        let q = quote_ident(c);
                        format!("t.{q} = NEW.{q}")
                    })
                    .collect::<Vec<_>>()
                    .join(" AND ");
                format!(
                    "INSERT INTO _driftless_pending (tbl, op{target}) SELECT {id}, {OP_CHECK}{key_cols} \
                     FROM {qtable} AS t WHERE {matches} AND NOT ({}); ",
                    same_key(row)
                )
            })
            .collect()
    };
    let name = |op: &str| format!("_driftless_{op}_{table}");
    vec![
        (
            name("insrep"),
            format!(
                "CREATE TRIGGER {} BEFORE INSERT ON {qtable} BEGIN {}END",
                quote_ident(&name("insrep")),
                body("NEW")
            ),
        ),
        (
            name("updrep"),
            format!(
                "CREATE TRIGGER {} BEFORE UPDATE ON {qtable} BEGIN {}END",
                quote_ident(&name("updrep")),
                body("OLD")
            ),
        ),
    ]
}

/// Installs the capture triggers unless exactly these are already installed. Leaving identical
/// triggers alone keeps the schema version still, so other connections (a running node, the
/// user's app) do not have to re-read the schema every time a tool opens the database. Returns
/// whether a capture trigger was (re)installed: records made before then by other triggers may
/// carry a mask over other columns.
pub fn install_triggers(
    conn: &Connection,
    schema: &TableSchema,
    id: i64,
    column_ids: &[u32],
) -> Result<bool, StoreError> {
    let unique = unique_indexes(conn, schema.name.as_str())?;
    let replace = replace_trigger_sql(schema, id, &unique);
    if replace.is_empty() {
        // a unique index was dropped: its guard triggers go too
        for op in ["insrep", "updrep"] {
            let name = format!("_driftless_{op}_{}", schema.name.as_str());
            let exists: bool = conn
                .query_row(
                    "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND name = ?1",
                    [&name],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(db)?
                > 0;
            if exists {
                conn.execute_batch(&format!("DROP TRIGGER {}", quote_ident(&name)))
                    .map_err(db)?;
            }
        }
    }
    let mut reinstalled = false;
    for (i, (name, sql)) in trigger_sql(schema, id, column_ids)
        .into_iter()
        .chain(replace)
        .enumerate()
    {
        let existing: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'trigger' AND name = ?1",
                [&name],
                |r| r.get(0),
            )
            .ok();
        if existing.as_deref() != Some(sql.as_str()) {
            conn.execute_batch(&format!(
                "DROP TRIGGER IF EXISTS {}; {sql};",
                quote_ident(&name)
            ))
            .map_err(db)?;
            reinstalled |= i < 3;
        }
    }
    Ok(reinstalled)
}

/// A synced table with its id and the SQL text driftless runs against it, built once per
/// schema (not per row).
#[derive(Debug)]
pub struct Synced {
    pub id: i64,
    pub schema: TableSchema,
    /// The stable id of each value column (declaration order), as metadata stores columns.
    pub column_ids: Vec<u32>,
    /// Value column names by stable id.
    pub by_id: std::collections::BTreeMap<u32, driftless_core::ColumnName>,
    /// `SELECT <value columns> FROM t WHERE <key> = ?..`
    pub select_row: String,
    /// `DELETE FROM t WHERE <key> = ?..`
    pub delete_row: String,
    /// Upsert of every column (the common case); partial rows build their statement on demand.
    pub upsert_all: String,
}

impl Synced {
    pub fn new(id: i64, schema: TableSchema, column_ids: Vec<u32>) -> Self {
        let table = quote_ident(schema.name.as_str());
        let keys = schema.key_columns();
        let key_where = keys
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = ?{}", quote_ident(c.name.as_str()), i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let values: Vec<String> = schema
            .value_columns()
            .map(|c| quote_ident(c.name.as_str()))
            .collect();
        let select = if values.is_empty() {
            "1".to_owned()
        } else {
            values.join(", ")
        };
        let all: Vec<&str> = schema.value_columns().map(|c| c.name.as_str()).collect();
        let upsert_all = upsert_sql(&schema, &all);
        let by_id = schema
            .value_columns()
            .zip(&column_ids)
            .map(|(c, id)| (*id, c.name.clone()))
            .collect();
        Synced {
            id,
            column_ids,
            by_id,
            select_row: format!("SELECT {select} FROM {table} WHERE {key_where}"),
            delete_row: format!("DELETE FROM {table} WHERE {key_where}"),
            upsert_all,
            schema,
        }
    }
}

impl driftless_store::rowmeta::ColumnIds for Synced {
    fn id_of(&self, column: &driftless_core::ColumnName) -> Option<u32> {
        self.schema
            .value_columns()
            .position(|c| &c.name == column)
            .map(|i| self.column_ids[i])
    }
    fn name_of(&self, id: u32) -> Option<&driftless_core::ColumnName> {
        self.by_id.get(&id)
    }
}

/// The stable ids of a table's value columns, assigning new ones (never reused) to columns seen
/// for the first time. Ids, not positions, because a dropped column shifts every later one.
pub fn column_ids(
    conn: &Connection,
    schema: &TableSchema,
    id: i64,
) -> Result<Vec<u32>, StoreError> {
    let mut out = Vec::new();
    for column in schema.value_columns() {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO _driftless_columns (tbl, id, name)
             SELECT ?1, coalesce(max(id) + 1, 0), ?2 FROM _driftless_columns WHERE tbl = ?1",
        )
        .and_then(|mut s| s.execute(rusqlite::params![id, column.name.as_str()]))
        .map_err(db)?;
        let cid: i64 = conn
            .prepare_cached("SELECT id FROM _driftless_columns WHERE tbl = ?1 AND name = ?2")
            .and_then(|mut s| {
                s.query_row(rusqlite::params![id, column.name.as_str()], |r| r.get(0))
            })
            .map_err(db)?;
        out.push(u32::try_from(cid).map_err(|_| {
            StoreError::Corrupt(format!("column id {cid} of {} out of range", schema.name))
        })?);
    }
    Ok(out)
}

/// `INSERT INTO t (<key>, <columns>) VALUES (?..) ON CONFLICT (<key>) DO UPDATE SET ...`
pub fn upsert_sql(schema: &TableSchema, columns: &[&str]) -> String {
    let keys = schema.key_columns();
    let key_names: Vec<String> = keys.iter().map(|c| quote_ident(c.name.as_str())).collect();
    let mut names = key_names.clone();
    let mut updates = Vec::new();
    for column in columns {
        let q = quote_ident(column);
        updates.push(format!("{q} = excluded.{q}"));
        names.push(q);
    }
    let placeholders = (1..=names.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let action = if updates.is_empty() {
        "NOTHING".to_owned()
    } else {
        format!("UPDATE SET {}", updates.join(", "))
    };
    format!(
        "INSERT INTO {} ({}) VALUES ({placeholders}) ON CONFLICT ({}) DO {action}",
        quote_ident(schema.name.as_str()),
        names.join(", "),
        key_names.join(", ")
    )
}

/// SQL that queues every existing row of a table as a local insert (bootstrap at install).
pub fn bootstrap_sql(schema: &TableSchema, id: i64) -> String {
    let keys = schema.key_columns();
    let target: String = (0..keys.len()).map(|i| format!(", k{i}")).collect();
    let source: String = keys
        .iter()
        .map(|c| format!(", {}", quote_ident(c.name.as_str())))
        .collect();
    format!(
        "INSERT INTO _driftless_pending (tbl, op{target}) SELECT {id}, {OP_INSERT}{source} FROM {}",
        quote_ident(schema.name.as_str())
    )
}

pub fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}
