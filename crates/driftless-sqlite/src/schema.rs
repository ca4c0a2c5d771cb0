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
    let described: Vec<(String, String, String)> = columns
        .iter()
        .map(|c| {
            let ty = match c.primary_key {
                Some(p) => format!("{} pk{p}", c.declared_type.to_ascii_lowercase()),
                None => c.declared_type.to_ascii_lowercase(),
            };
            (c.name.as_str().to_owned(), ty, c.kind.as_str().to_owned())
        })
        .collect();
    let fingerprint = SchemaFingerprint::compute(
        &config.name,
        described
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
    );
    Ok(TableSchema {
        name: config.name.clone(),
        columns,
        rules,
        fingerprint,
    })
}

fn trigger_name(op: &str, table: &str) -> String {
    quote_ident(&format!("_driftless_{op}_{table}"))
}

/// SQL that (re)creates the three capture triggers of a table. Each records only the operation
/// and the primary key; values are read from the table when the write is stamped.
pub fn trigger_sql(schema: &TableSchema) -> String {
    let table = schema.name.as_str();
    let qtable = quote_ident(table);
    let lit = quote_literal(table);
    let keys = schema.key_columns();
    let target: String = (0..keys.len()).map(|i| format!(", k{i}")).collect();
    let of = |prefix: &str| -> String {
        keys.iter()
            .map(|c| format!(", {prefix}.{}", quote_ident(c.name.as_str())))
            .collect()
    };
    let key_changed = keys
        .iter()
        .map(|c| {
            let q = quote_ident(c.name.as_str());
            format!("OLD.{q} IS NOT NEW.{q}")
        })
        .collect::<Vec<_>>()
        .join(" OR ");
    let when = "WHEN (SELECT applying FROM _driftless_state) = 0";
    let (ins, upd, del) = (
        trigger_name("ins", table),
        trigger_name("upd", table),
        trigger_name("del", table),
    );
    format!(
        r#"
        DROP TRIGGER IF EXISTS {ins};
        DROP TRIGGER IF EXISTS {upd};
        DROP TRIGGER IF EXISTS {del};
        CREATE TRIGGER {ins} AFTER INSERT ON {qtable} {when} BEGIN
            INSERT INTO _driftless_pending (tbl, op{target}) VALUES ({lit}, 'I'{new});
        END;
        CREATE TRIGGER {upd} AFTER UPDATE ON {qtable} {when} BEGIN
            INSERT INTO _driftless_pending (tbl, op{target})
                SELECT {lit}, 'D'{old} WHERE {key_changed};
            INSERT INTO _driftless_pending (tbl, op{target}) VALUES ({lit}, 'U'{new});
        END;
        CREATE TRIGGER {del} AFTER DELETE ON {qtable} {when} BEGIN
            INSERT INTO _driftless_pending (tbl, op{target}) VALUES ({lit}, 'D'{old});
        END;
        "#,
        new = of("NEW"),
        old = of("OLD"),
    )
}

/// SQL that queues every existing row of a table as a local insert (bootstrap at install).
pub fn bootstrap_sql(schema: &TableSchema) -> String {
    let keys = schema.key_columns();
    let target: String = (0..keys.len()).map(|i| format!(", k{i}")).collect();
    let source: String = keys
        .iter()
        .map(|c| format!(", {}", quote_ident(c.name.as_str())))
        .collect();
    format!(
        "INSERT INTO _driftless_pending (tbl, op{target}) SELECT {}, 'I'{source} FROM {}",
        quote_literal(schema.name.as_str()),
        quote_ident(schema.name.as_str())
    )
}

pub fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}
