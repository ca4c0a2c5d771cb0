//! Introspection of synced tables, the capture triggers installed on them, and the SQL text
//! driftless runs against them (built once per schema, never from anything received).

use crate::meta::KEY_COLUMNS_MAX;
use crate::types::{PgKind, SUPPORTED_TYPES, Wire};
use driftless_core::{ColumnKind, ColumnName, SchemaFingerprint, TableRules};
use driftless_store::{ColumnSchema, StoreError, TableConfig, TableSchema};
use postgres::Client;

/// `"name"` with embedded quotes doubled: every identifier reaches SQL through this.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled (only for text driftless itself generates).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn schema_error(table: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Schema {
        table: table.to_owned(),
        reason: reason.into(),
    }
}

/// One synced column as PostgreSQL declares it.
#[derive(Debug, Clone)]
pub struct PgColumn {
    pub name: ColumnName,
    /// `"name"`
    pub quoted: String,
    pub kind: PgKind,
    /// The full declared type (`character varying(20)`, `numeric(10,2)`, `public.price`).
    pub declared: String,
    /// The type to cast bound values to (no type modifier: the column's own modifier applies on
    /// assignment, so `varchar(3)` still refuses a longer text instead of truncating it).
    pub cast: String,
}

/// Reads a table's columns and checks it can be synced.
pub fn introspect(
    client: &mut Client,
    table_schema: &str,
    config: &TableConfig,
) -> Result<(TableSchema, Vec<PgColumn>, u32, bool), StoreError> {
    let name = config.name.as_str();
    let found = client
        .query_opt(
            "SELECT c.oid, c.relkind::pg_catalog.text FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table_schema, &name],
        )
        .map_err(db)?;
    let Some(found) = found else {
        return Err(schema_error(
            name,
            format!("no such table in schema {table_schema}"),
        ));
    };
    let table_oid: u32 = found.get(0);
    let relkind: String = found.get(1);
    match relkind.as_str() {
        "r" | "p" => {}
        "v" | "m" => return Err(schema_error(name, "is a view, not a table")),
        other => {
            return Err(schema_error(
                name,
                format!("is not a table (relkind {other})"),
            ));
        }
    }
    let rows = client
        .query(
            "SELECT a.attname::pg_catalog.text, a.atttypid, a.attnotnull,
                    a.attgenerated::pg_catalog.text, a.attidentity::pg_catalog.text,
                    pg_catalog.format_type(a.atttypid, a.atttypmod),
                    pg_catalog.format_type(a.atttypid, NULL),
                    COALESCE((SELECT k.n FROM pg_catalog.pg_index i,
                        unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                        WHERE i.indrelid = a.attrelid AND i.indisprimary AND k.attnum = a.attnum), 0)
             FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&table_oid],
        )
        .map_err(db)?;
    let mut columns = Vec::new();
    let mut pg_columns = Vec::new();
    let mut identity_always = false;
    for row in rows {
        let column: String = row.get(0);
        let type_oid: u32 = row.get(1);
        let not_null: bool = row.get(2);
        let generated: String = row.get(3);
        let identity: String = row.get(4);
        let declared: String = row.get(5);
        let mut cast: String = row.get(6);
        let pk: i64 = row.get(7);
        if !generated.is_empty() {
            // generated columns are computed by PostgreSQL on every replica; never synced
            continue;
        }
        identity_always |= identity == "a";
        let base = base_type(client, type_oid)?;
        let Some(kind) = PgKind::from_base_oid(base) else {
            return Err(schema_error(
                name,
                format!(
                    "column {column} has type {declared}, which driftless cannot sync without \
                     losing information; supported: {SUPPORTED_TYPES}"
                ),
            ));
        };
        if base == type_oid && kind == PgKind::Bpchar {
            // `character` without a length means char(1): cast to the unbounded `bpchar`
            cast = "pg_catalog.bpchar".into();
        }
        let column_name = ColumnName::new(&column)
            .map_err(|e| schema_error(name, format!("column {column:?}: {e}")))?;
        if pk > 0 && !kind.can_be_key() {
            return Err(schema_error(
                name,
                format!(
                    "primary-key column {column} has type {declared}; driftless keys must be \
                     integer, boolean, text, varchar, char(n), bytea or uuid columns"
                ),
            ));
        }
        columns.push(ColumnSchema {
            name: column_name.clone(),
            declared_type: declared.clone(),
            kind: ColumnKind::Lww,
            primary_key: (pk > 0).then(|| (pk - 1) as usize),
            not_null,
        });
        pg_columns.push(PgColumn {
            quoted: quote_ident(&column),
            name: column_name,
            kind,
            declared,
            cast,
        });
    }
    let key_count = columns.iter().filter(|c| c.primary_key.is_some()).count();
    if key_count == 0 {
        return Err(schema_error(
            name,
            "has no PRIMARY KEY; driftless identifies rows across replicas by primary key, \
             so add one (e.g. `id bigint PRIMARY KEY`)",
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
        let Some(position) = columns.iter().position(|c| &c.name == column) else {
            return Err(schema_error(
                name,
                format!("configured column {column} ({kind}) does not exist"),
            ));
        };
        let schema = &mut columns[position];
        if schema.primary_key.is_some() {
            return Err(schema_error(
                name,
                format!("column {column} is part of the primary key and cannot be a {kind}"),
            ));
        }
        if *kind == ColumnKind::Counter
            && !matches!(pg_columns[position].kind, PgKind::Int | PgKind::Numeric)
        {
            return Err(schema_error(
                name,
                format!(
                    "counter column {column} has type {}; counters need an integer or numeric column",
                    schema.declared_type
                ),
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
    Ok((
        TableSchema {
            name: config.name.clone(),
            columns,
            rules,
            fingerprint,
        },
        pg_columns,
        table_oid,
        identity_always,
    ))
}

/// Follows domains down to their base type.
fn base_type(client: &mut Client, mut type_oid: u32) -> Result<u32, StoreError> {
    // Domains over domains are allowed, but a chain longer than this is a catalog loop.
    const DOMAIN_DEPTH_MAX: usize = 32;
    for _ in 0..DOMAIN_DEPTH_MAX {
        if PgKind::from_base_oid(type_oid).is_some() {
            return Ok(type_oid);
        }
        let row = client
            .query_one(
                "SELECT typtype::pg_catalog.text, typbasetype FROM pg_catalog.pg_type WHERE oid = $1",
                &[&type_oid],
            )
            .map_err(db)?;
        let typtype: String = row.get(0);
        if typtype != "d" {
            return Ok(type_oid);
        }
        type_oid = row.get(1);
    }
    Err(StoreError::Corrupt(format!(
        "domain chain of type {type_oid} is too deep"
    )))
}

/// Operation codes recorded by the triggers (as in the SQLite adapter).
pub const OP_INSERT: i16 = 1;
pub const OP_UPDATE: i16 = 2;
pub const OP_DELETE: i16 = 3;

/// Names of the capture triggers (statement-level, one per operation); the version changes when
/// their shape changes, so older ones are replaced (`driftless_capture_v1` was a row trigger).
pub const CAPTURE_TRIGGERS: [(&str, &str); 3] = [
    ("driftless_capture_v2_ins", "INSERT"),
    ("driftless_capture_v2_upd", "UPDATE"),
    ("driftless_capture_v2_del", "DELETE"),
];
/// The transition tables the capture triggers declare (`REFERENCING ... TABLE AS`).
pub const NEW_ROWS: &str = "driftless_new_rows";
/// The row-level capture trigger, kept for partitioned tables.
pub const ROW_CAPTURE_TRIGGER: &str = "driftless_capture_v1";
pub const OLD_ROWS: &str = "driftless_old_rows";
pub const TRUNCATE_TRIGGER: &str = "driftless_no_truncate_v1";
/// The setting driftless's own transactions turn on (`SET LOCAL`) so the triggers skip them.
pub const APPLYING_SETTING: &str = "driftless.applying";

/// A synced table with its id and the SQL text driftless runs against it, built once per
/// schema (not per row).
#[derive(Debug)]
pub struct Synced {
    pub id: i32,
    pub schema: TableSchema,
    pub oid: u32,
    /// `"schema"."table"`
    pub qualified: String,
    /// Key columns in key order.
    pub keys: Vec<PgColumn>,
    /// Non-key synced columns in declaration order.
    pub values: Vec<PgColumn>,
    /// Whether an insert must say `OVERRIDING SYSTEM VALUE` (a `GENERATED ALWAYS` identity).
    pub identity_always: bool,
    /// `SELECT u.i, <values...> FROM unnest(<keys>) WITH ORDINALITY u JOIN t ...`: the rows of
    /// many keys at once, each tagged with its 1-based position in the key arrays.
    pub read_rows: String,
    /// Locks the rows of many keys (`FOR UPDATE`): under REPEATABLE READ this fails with a
    /// serialization error if any of them changed since the transaction's snapshot.
    pub lock_rows: String,
    pub delete_rows: String,
    /// `SELECT keys FROM t WHERE (keys) > (after) ORDER BY keys LIMIT n` (key byte order).
    pub keys_after: String,
    pub keys_from_start: String,
    /// The capture function body and the statements installing it.
    pub function_name: String,
    pub function_body: String,
    /// The same for a partitioned table (row-level; see `row_capture_function_body`).
    pub row_function_body: String,
    /// The stable id of each value column (same order as `values`), from `columns`: ids, not
    /// positions, because a dropped column would shift every later one.
    pub column_ids: Vec<u32>,
    pub by_id: std::collections::HashMap<u32, ColumnName>,
}

impl driftless_store::rowmeta::ColumnIds for Synced {
    fn id_of(&self, column: &ColumnName) -> Option<u32> {
        self.values
            .iter()
            .position(|c| &c.name == column)
            .map(|i| self.column_ids[i])
    }
    fn name_of(&self, id: u32) -> Option<&ColumnName> {
        self.by_id.get(&id)
    }
}

/// The bit of the changed-columns mask that stands for the column with stable id `id` (ids
/// from 63 up share the last bit: a write to one of them counts as a write to all of them).
pub fn mask_bit(id: u32) -> u32 {
    id.min(63)
}

impl Synced {
    pub fn new(
        id: i32,
        schema: TableSchema,
        columns: Vec<PgColumn>,
        oid: u32,
        identity_always: bool,
        table_schema: &str,
        column_ids: Vec<u32>,
    ) -> Self {
        let qualified = format!(
            "{}.{}",
            quote_ident(table_schema),
            quote_ident(schema.name.as_str())
        );
        let mut keys: Vec<(usize, PgColumn)> = Vec::new();
        let mut values = Vec::new();
        for (c, pg) in schema.columns.iter().zip(columns) {
            match c.primary_key {
                Some(p) => keys.push((p, pg)),
                None => values.push(pg),
            }
        }
        keys.sort_by_key(|(p, _)| *p);
        let keys: Vec<PgColumn> = keys.into_iter().map(|(_, c)| c).collect();
        let key_arrays = key_unnest(&keys);
        let key_names: Vec<String> = (0..keys.len()).map(|i| format!("k{i}")).collect();
        let join = key_join(&keys);
        let value_reads: String = values
            .iter()
            .map(|c| format!(", {}", c.kind.read_expr(&format!("t.{}", c.quoted))))
            .collect();
        let read_rows = format!(
            "SELECT u.i{value_reads} FROM {key_arrays} WITH ORDINALITY AS u({}, i) \
             JOIN {qualified} AS t ON {join}",
            key_names.join(", ")
        );
        let lock_rows = format!(
            "SELECT 1 FROM {key_arrays} AS u({}) JOIN {qualified} AS t ON {join} FOR UPDATE OF t",
            key_names.join(", ")
        );
        let delete_rows = format!(
            "DELETE FROM {qualified} AS t USING {key_arrays} AS u({}) WHERE {join}",
            key_names.join(", ")
        );
        let ordered: Vec<String> = keys.iter().map(key_order_expr).collect();
        let key_reads: Vec<String> = keys
            .iter()
            .map(|c| c.kind.read_expr(&format!("t.{}", c.quoted)))
            .collect();
        let params: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, c)| format!("(${})::{}", i + 1, c.cast))
            .collect();
        let keys_after = format!(
            "SELECT {} FROM {qualified} AS t WHERE ({}) > ({}) ORDER BY {} LIMIT ${}",
            key_reads.join(", "),
            ordered.join(", "),
            params
                .iter()
                .zip(&keys)
                .map(|(p, c)| order_collation(c, p))
                .collect::<Vec<_>>()
                .join(", "),
            ordered.join(", "),
            keys.len() + 1
        );
        let keys_from_start = format!(
            "SELECT {} FROM {qualified} AS t ORDER BY {} LIMIT $1",
            key_reads.join(", "),
            ordered.join(", ")
        );
        let function_name = format!("capture_{id}");
        let function_body = capture_function_body(id, &keys, &values, &column_ids);
        let row_function_body = row_capture_function_body(id, &keys, &values, &column_ids);
        let by_id = values
            .iter()
            .zip(&column_ids)
            .map(|(c, id)| (*id, c.name.clone()))
            .collect();
        Synced {
            id,
            schema,
            oid,
            qualified,
            keys,
            values,
            identity_always,
            read_rows,
            lock_rows,
            delete_rows,
            keys_after,
            keys_from_start,
            function_name,
            function_body,
            row_function_body,
            column_ids,
            by_id,
        }
    }

    /// `INSERT INTO t (<keys>, <present columns>) SELECT ... FROM unnest(...) ON CONFLICT (<keys>)
    /// DO UPDATE SET ...`: writes many rows in one statement. `present` indexes `values`.
    pub fn upsert_sql(&self, present: &[usize]) -> String {
        let mut names: Vec<String> = self.keys.iter().map(|c| c.quoted.clone()).collect();
        let mut selects: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, c)| format!("u.k{i}::{}", c.cast))
            .collect();
        let mut arrays: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}", i + 1, c.kind.write_wire().array_type()))
            .collect();
        let mut aliases: Vec<String> = (0..self.keys.len()).map(|i| format!("k{i}")).collect();
        let mut updates = Vec::new();
        for (n, &index) in present.iter().enumerate() {
            let c = &self.values[index];
            names.push(c.quoted.clone());
            selects.push(format!("u.c{n}::{}", c.cast));
            arrays.push(format!(
                "${}::{}",
                self.keys.len() + n + 1,
                c.kind.write_wire().array_type()
            ));
            aliases.push(format!("c{n}"));
            updates.push(format!("{} = EXCLUDED.{}", c.quoted, c.quoted));
        }
        let key_names: Vec<String> = self.keys.iter().map(|c| c.quoted.clone()).collect();
        let action = if updates.is_empty() {
            "NOTHING".to_owned()
        } else {
            format!("UPDATE SET {}", updates.join(", "))
        };
        let overriding = if self.identity_always {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        };
        format!(
            "INSERT INTO {} AS t ({}){overriding} SELECT {} FROM unnest({}) AS u({}) \
             ON CONFLICT ({}) DO {action}",
            self.qualified,
            names.join(", "),
            selects.join(", "),
            arrays.join(", "),
            aliases.join(", "),
            key_names.join(", ")
        )
    }

    /// The SQL turning a value bound as the column's wire type into what the column shows
    /// (for comparing a merge-state value with table content when they differ in form only).
    pub fn canonical_sql(column: &PgColumn) -> String {
        format!(
            "SELECT {} FROM (SELECT CAST(($1::{})::{} AS {}) AS v) AS s",
            column.kind.read_expr("s.v"),
            match column.kind.write_wire() {
                Wire::Int => "pg_catalog.int8",
                Wire::Float => "pg_catalog.float8",
                Wire::Bool => "pg_catalog.bool",
                Wire::Text => "pg_catalog.text",
                Wire::Bytes => "pg_catalog.bytea",
            },
            column.cast,
            column.declared
        )
    }
}

/// `unnest($1::int8[], $2::text[], ...)` over the key columns, parameters from
/// `$1`.
fn key_unnest(keys: &[PgColumn]) -> String {
    let arrays: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", i + 1, c.kind.write_wire().array_type()))
        .collect();
    format!("unnest({})", arrays.join(", "))
}

/// `t."a" = u.k0::integer AND ...` (the parameter cast to the column's type, so the primary-key
/// index is used).
fn key_join(keys: &[PgColumn]) -> String {
    keys.iter()
        .enumerate()
        .map(|(i, c)| format!("t.{} = u.k{i}::{}", c.quoted, c.cast))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// A key column in an ORDER BY / row comparison giving driftless's key byte order: text in the
/// "C" collation (byte order of UTF-8), other key types in their natural order.
fn key_order_expr(c: &PgColumn) -> String {
    order_collation(c, &format!("t.{}", c.quoted))
}

fn order_collation(c: &PgColumn, expr: &str) -> String {
    match c.kind {
        PgKind::Text | PgKind::Bpchar => format!("({expr})::pg_catalog.text COLLATE \"C\""),
        _ => expr.to_owned(),
    }
}

/// The changed-columns mask of an update, from the old row `o` and the new row `n` (`o` may
/// be all NULL: then every non-NULL column counts as changed). Types whose equality is not
/// exact identity (numeric `1.0 = 1.00`, float `-0 = 0`, json has none) are compared by text.
fn mask_expr(values: &[PgColumn], column_ids: &[u32], o: &str, n: &str) -> String {
    if values.is_empty() {
        return "0::pg_catalog.int8".into();
    }
    values
        .iter()
        .zip(column_ids)
        .map(|(c, id)| {
            let (old, new) = match c.kind {
                PgKind::Int | PgKind::Bool | PgKind::Text | PgKind::Bytea | PgKind::Uuid
                | PgKind::Date => (format!("{o}.{}", c.quoted), format!("{n}.{}", c.quoted)),
                _ => (
                    format!("({o}.{})::pg_catalog.text", c.quoted),
                    format!("({n}.{})::pg_catalog.text", c.quoted),
                ),
            };
            format!(
                "(CASE WHEN {old} IS DISTINCT FROM {new} THEN (1::pg_catalog.int8 << {}) ELSE 0 END)",
                mask_bit(*id)
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The body of a table's capture function. Records the table id, the operation, the key (as
/// fixed text forms) and for an update the mask of the columns it changed (storage format 2
/// keeps no copy of the old values to compare with, so the trigger, which still sees the old
/// row, says which columns changed); values are read when the write is stamped.
fn capture_function_body(
    id: i32,
    keys: &[PgColumn],
    values: &[PgColumn],
    column_ids: &[u32],
) -> String {
    let targets: String = (0..keys.len()).map(|i| format!(", k{i}")).collect();
    let of = |alias: &str| -> String {
        keys.iter()
            .map(|c| {
                format!(
                    ", {}",
                    c.kind.trigger_key_expr(&format!("{alias}.{}", c.quoted))
                )
            })
            .collect()
    };
    let same_key = keys
        .iter()
        .map(|c| format!("n.{q} = o.{q}", q = c.quoted))
        .collect::<Vec<_>>()
        .join(" AND ");
    let (new, old) = (of("n"), of("o"));
    let mask = mask_expr(values, column_ids, "o", "n");
    // `PENDING` is replaced by the qualified pending table when installed. One statement per
    // user statement, over its transition tables: a 10,000-row INSERT records its keys with
    // one INSERT ... SELECT instead of 10,000 trigger calls. An UPDATE that changed keys records
    // the old keys that no new row has as deletes (a swap of two keys deletes nothing: both
    // keys still exist, with new content, and each new row's mask is taken against the old row
    // that had its key, which is what that key's merge state holds).
    format!(
        "BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO PENDING (tbl, op{targets}) SELECT {id}, {OP_INSERT}{new} FROM {NEW_ROWS} AS n;
  ELSIF TG_OP = 'UPDATE' THEN
    INSERT INTO PENDING (tbl, op{targets}) SELECT {id}, {OP_DELETE}{old} FROM {OLD_ROWS} AS o
      WHERE NOT EXISTS (SELECT 1 FROM {NEW_ROWS} AS n WHERE {same_key});
    INSERT INTO PENDING (tbl, op, cols{targets}) SELECT {id}, {OP_UPDATE}, {mask}{new}
      FROM {NEW_ROWS} AS n LEFT JOIN {OLD_ROWS} AS o ON {same_key};
  ELSE
    INSERT INTO PENDING (tbl, op{targets}) SELECT {id}, {OP_DELETE}{old} FROM {OLD_ROWS} AS o;
  END IF;
  RETURN NULL;
END"
    )
}

/// The row-level variant, for partitioned tables: a statement trigger on a partitioned table
/// does not fire for statements that name one of its partitions, while a row trigger is cloned
/// onto every partition (present and future), so writes straight into a partition are captured.
/// An update that changed the key records no mask (every column counts as written): the new
/// key's state need not be the old row's.
fn row_capture_function_body(
    id: i32,
    keys: &[PgColumn],
    values: &[PgColumn],
    column_ids: &[u32],
) -> String {
    let targets: String = (0..keys.len()).map(|i| format!(", k{i}")).collect();
    let of = |record: &str| -> String {
        keys.iter()
            .map(|c| {
                format!(
                    ", {}",
                    c.kind.trigger_key_expr(&format!("{record}.{}", c.quoted))
                )
            })
            .collect()
    };
    let row = |record: &str| -> String {
        keys.iter()
            .map(|c| format!("{record}.{}", c.quoted))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (new, old) = (of("NEW"), of("OLD"));
    let mask = mask_expr(values, column_ids, "OLD", "NEW");
    // `PENDING` is replaced by the qualified pending table when installed.
    format!(
        "BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO PENDING (tbl, op{targets}) VALUES ({id}, {OP_INSERT}{new});
  ELSIF TG_OP = 'UPDATE' THEN
    IF ROW({old_row}) IS DISTINCT FROM ROW({new_row}) THEN
      INSERT INTO PENDING (tbl, op{targets}) VALUES ({id}, {OP_DELETE}{old});
      INSERT INTO PENDING (tbl, op{targets}) VALUES ({id}, {OP_UPDATE}{new});
    ELSE
      INSERT INTO PENDING (tbl, op, cols{targets}) VALUES ({id}, {OP_UPDATE}, {mask}{new});
    END IF;
  ELSE
    INSERT INTO PENDING (tbl, op{targets}) VALUES ({id}, {OP_DELETE}{old});
  END IF;
  RETURN NULL;
END",
        old_row = row("OLD"),
        new_row = row("NEW"),
    )
}

/// A dollar-quote tag that does not occur in `body`.
pub fn dollar_quote(body: &str) -> String {
    let mut n = 0u32;
    loop {
        let tag = format!("$driftless{n}$");
        if !body.contains(&tag) {
            return tag;
        }
        n += 1;
    }
}

pub fn db(e: postgres::Error) -> StoreError {
    if crate::store::is_unreachable(&e) {
        StoreError::Unavailable(crate::store::describe(&e))
    } else {
        StoreError::Database(crate::store::describe(&e))
    }
}
