//! Round trips of every mapped PostgreSQL type: PostgreSQL → driftless value → PostgreSQL, and
//! PostgreSQL → SQLite → PostgreSQL (the values SQLite stores are the documented text forms);
//! values written at a SQLite replica in other forms land in PostgreSQL without looking like
//! local edits; values a column cannot hold become dead letters with a clear reason.

mod common;

use common::{TestDb, sync};
use driftless_core::{ColumnName, NodeId, TableName, Value};
use driftless_postgres::{PostgresOptions, PostgresStore};
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{Store, TableConfig};
use postgres::Client;
use std::collections::BTreeMap;

const PG_DDL: &str = "
    CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
    CREATE TABLE typed (
        id bigint PRIMARY KEY,
        i2 smallint, i4 integer, i8 bigint, b boolean, f4 real, f8 double precision,
        num numeric, num2 numeric(10,2), t text, vc varchar(20), ch char(5), by bytea,
        d date, ts timestamp, tstz timestamptz, u uuid, j json, jb jsonb, dom positive
    );
    CREATE TABLE keyed (
        u uuid, t text, by bytea, b boolean, i integer, v text,
        PRIMARY KEY (u, t, by, b, i)
    );
";

/// SQLite stores the values as driftless maps them: integers, reals, text forms and blobs.
const SQLITE_DDL: &str = "
    CREATE TABLE typed (
        id INTEGER PRIMARY KEY,
        i2 INTEGER, i4 INTEGER, i8 INTEGER, b INTEGER, f4 REAL, f8 REAL,
        num TEXT, num2 TEXT, t TEXT, vc TEXT, ch TEXT, by BLOB,
        d TEXT, ts TEXT, tstz TEXT, u TEXT, j TEXT, jb TEXT, dom INTEGER
    );
    CREATE TABLE keyed (
        u TEXT, t TEXT, by BLOB, b INTEGER, i INTEGER, v TEXT,
        PRIMARY KEY (u, t, by, b, i)
    );
";

const ROWS: &str = r#"
    INSERT INTO typed VALUES
      (1, -32768, 2147483647, 9223372036854775807, true, 0.1, 3.141592653589793,
       '12345678901234567890.123456789012', 1.5, 'it''s ü 😀', 'varchar', 'ab', '\x00ff00'::bytea,
       '2024-02-29', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.5+02',
       'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{"b": 1,  "a": [1, 2]}', '{"b": 1, "a": [1, 2]}', 7),
      (2, 0, -1, -9223372036854775808, false, 'Infinity', 'NaN',
       'NaN', 0, '', '', '     ', '\x'::bytea,
       '0044-03-15 BC', 'infinity', '-infinity',
       '00000000-0000-0000-0000-000000000000', 'null', '"text"', 1),
      (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL),
      (4, 1, 2, 3, true, -1.5e-40, 1e308, '-0.000001', -99999999.99, 'x', 'y', 'z', '\x01'::bytea,
       '1999-12-31', '2000-01-01 00:00:00', '1970-01-01 00:00:00+00',
       'ffffffff-ffff-ffff-ffff-ffffffffffff', '[]', '{}', 2147483647);
    INSERT INTO keyed VALUES
      ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'k', '\x00'::bytea, true, -5, 'one'),
      ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'k', '\x0000'::bytea, false, 7, 'two');
"#;

fn configs() -> Vec<TableConfig> {
    ["typed", "keyed"]
        .iter()
        .map(|t| TableConfig::new(TableName::new(t).unwrap()))
        .collect()
}

fn open_pg(db: &TestDb, node: u128) -> (PostgresStore, Client) {
    let mut client = db.client();
    client.batch_execute(PG_DDL).unwrap();
    let mut options = PostgresOptions::new(configs());
    options.node_id = Some(NodeId::new(node));
    (PostgresStore::open(&db.url, options).unwrap(), client)
}

/// Every row as PostgreSQL prints it (the test clients run with TimeZone UTC).
fn rows(client: &mut Client, table: &str) -> Vec<String> {
    client
        .query(&format!("SELECT r::text FROM {table} AS r ORDER BY 1"), &[])
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

fn cells_of(changes: &[driftless_core::Change], id: i64) -> BTreeMap<String, Value> {
    let change = changes
        .iter()
        .find(|c| c.table.as_str() == "typed" && c.key == driftless_core::PrimaryKey::integer(id))
        .unwrap();
    change
        .cells()
        .iter()
        .map(|c| (c.column.as_str().to_owned(), c.value.clone()))
        .collect()
}

#[test]
fn every_mapped_type_round_trips_through_postgres_and_sqlite() {
    let Some(dbs) = common::databases("types", 3) else {
        return;
    };
    let (mut a, mut ca) = open_pg(&dbs[0], 1);
    let (mut b, mut cb) = open_pg(&dbs[1], 2);
    let (mut c, mut cc) = open_pg(&dbs[2], 3);
    ca.batch_execute(ROWS).unwrap();
    let changes = a.capture(100).unwrap().changes;
    assert_eq!(changes.len(), 6);

    // the documented driftless values
    let one = cells_of(&changes, 1);
    let text = |s: &str| Value::Text(s.into());
    assert_eq!(one["i2"], Value::Integer(-32768));
    assert_eq!(one["i8"], Value::Integer(i64::MAX));
    assert_eq!(one["b"], Value::Integer(1));
    assert_eq!(one["f4"], Value::Real(f64::from(0.1f32)));
    assert_eq!(one["f8"], Value::Real(std::f64::consts::PI));
    assert_eq!(one["num"], text("12345678901234567890.123456789012"));
    assert_eq!(one["num2"], text("1.50"));
    assert_eq!(one["t"], text("it's ü 😀"));
    assert_eq!(one["ch"], text("ab"));
    assert_eq!(one["by"], Value::Blob(vec![0, 255, 0]));
    assert_eq!(one["d"], text("2024-02-29"));
    assert_eq!(one["ts"], text("2024-01-02 03:04:05.123456"));
    assert_eq!(one["tstz"], text("2024-01-02 01:04:05.5+00:00"));
    assert_eq!(one["u"], text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    assert_eq!(one["j"], text(r#"{"b": 1,  "a": [1, 2]}"#));
    assert_eq!(one["jb"], text(r#"{"a": [1, 2], "b": 1}"#));
    assert_eq!(one["dom"], Value::Integer(7));
    let two = cells_of(&changes, 2);
    assert_eq!(two["f4"], Value::Real(f64::INFINITY));
    assert!(matches!(two["f8"], Value::Real(r) if r.is_nan()));
    assert_eq!(two["num"], text("NaN"));
    assert_eq!(two["d"], text("0044-03-15 BC"));
    assert_eq!(two["ts"], text("infinity"));
    assert_eq!(two["tstz"], text("-infinity"));
    assert_eq!(two["ch"], text(""));

    // PostgreSQL -> PostgreSQL
    let report = sync(&mut a, &mut b);
    assert_eq!((report.applied, report.dead_lettered), (6, 0), "{report:?}");
    for table in ["typed", "keyed"] {
        assert_eq!(rows(&mut cb, table), rows(&mut ca, table), "{table}");
    }
    assert!(
        b.capture(100).unwrap().changes.is_empty(),
        "no phantom local writes"
    );

    // PostgreSQL -> SQLite -> PostgreSQL
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let lite_client = rusqlite::Connection::open(&path).unwrap();
    lite_client.execute_batch(SQLITE_DDL).unwrap();
    let mut options = SqliteOptions::new(configs());
    options.node_id = Some(NodeId::new(9));
    let mut s = SqliteStore::open(&path, options).unwrap();
    // the same columns under the documented mapping are the same schema, whatever the declared
    // types (so a mixed link does not warn about a schema difference that is not there)
    let fingerprints = |schemas: &[driftless_store::TableSchema]| -> Vec<_> {
        schemas
            .iter()
            .map(|t| (t.name.clone(), t.fingerprint))
            .collect()
    };
    assert_eq!(fingerprints(s.schemas()), fingerprints(a.schemas()));
    let report = sync(&mut a, &mut s);
    assert_eq!((report.applied, report.dead_lettered), (6, 0), "{report:?}");
    let stored: (String, String, i64) = lite_client
        .query_row("SELECT tstz, u, b FROM typed WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(
        stored,
        (
            "2024-01-02 01:04:05.5+00:00".into(),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into(),
            1
        )
    );
    let report = sync(&mut s, &mut c);
    assert_eq!((report.applied, report.dead_lettered), (6, 0), "{report:?}");
    for table in ["typed", "keyed"] {
        assert_eq!(rows(&mut cc, table), rows(&mut ca, table), "{table}");
    }
    assert!(
        c.capture(100).unwrap().changes.is_empty(),
        "no phantom local writes"
    );

    // Values written at the SQLite replica in other forms: stored in PostgreSQL's form, and not
    // mistaken for local edits afterwards.
    lite_client
        .execute_batch(
            "INSERT INTO typed (id, f8, num, ts, tstz, u, d, jb, ch) VALUES
             (10, 3, 5, '2024-03-01T10:00:00', '2024-03-01T12:00:00+02:00',
              'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '2024-03-01', '{\"b\":1,\"a\":2}', 'x')",
        )
        .unwrap();
    assert_eq!(s.capture(10).unwrap().changes.len(), 1);
    let report = sync(&mut s, &mut c);
    assert_eq!((report.applied, report.dead_lettered), (1, 0), "{report:?}");
    let shown: String = cc
        .query_one(
            "SELECT f8::text || '|' || num::text || '|' || ts::text || '|' || tstz::text || '|' || u::text || '|' || jb::text FROM typed WHERE id = 10",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        shown,
        "3|5|2024-03-01 10:00:00|2024-03-01 10:00:00+00|a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|{\"a\": 2, \"b\": 1}"
    );
    assert!(
        c.capture(10).unwrap().changes.is_empty(),
        "no phantom local writes"
    );
    let check = c
        .verify_chunk(&TableName::new("typed").unwrap(), None, 100, false)
        .unwrap();
    assert_eq!((check.restored, check.adopted), (0, 0), "{check:?}");
    cc.batch_execute("UPDATE typed SET t = 'edited' WHERE id = 10")
        .unwrap();
    let edit = c.capture(10).unwrap().changes;
    assert_eq!(edit.len(), 1);
    let columns: Vec<&str> = edit[0].cells().iter().map(|c| c.column.as_str()).collect();
    assert_eq!(columns, vec!["t"], "only the edited column");

    // Values a column cannot hold are refused with a reason, not converted.
    lite_client
        .execute_batch(
            "INSERT INTO typed (id, i4) VALUES (20, 'not a number');
             INSERT INTO typed (id, t) VALUES (21, CAST(X'610062' AS TEXT));
             INSERT INTO typed (id, i2) VALUES (22, 40000);
             INSERT INTO typed (id, u) VALUES (23, 'not-a-uuid');
             INSERT INTO typed (id, dom) VALUES (24, -1);",
        )
        .unwrap();
    assert_eq!(s.capture(10).unwrap().changes.len(), 5);
    let report = sync(&mut s, &mut c);
    assert_eq!(report.dead_lettered, 5, "{report:?}");
    let reasons: Vec<String> = c
        .dead_letters(10)
        .unwrap()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert!(
        reasons[0].contains("column i4") && reasons[0].contains("integer"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("NUL"), "{reasons:?}");
    assert!(reasons[2].contains("out of range"), "{reasons:?}");
    assert!(reasons[3].contains("uuid"), "{reasons:?}");
    assert!(reasons[4].contains("positive"), "{reasons:?}");
    let _ = ColumnName::new("x");
}
