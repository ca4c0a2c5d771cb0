-- The storage floor of PostgreSQL -> PostgreSQL sync with driftless: what the row writes
-- every replicated insert needs cost on this server, measured next to a plain insert of the
-- same row in the same run, as ratios. It ignores everything else driftless does (reading,
-- merging, framing, the network), so it bounds from above what any tuning of the current
-- storage design can reach. docs/benchmarks.md explains how to read it.
--
--   psql "host=127.0.0.1 user=postgres dbname=test" -f crates/driftless-node/benches/pg_floor.sql
--
-- It works in a schema of its own, `driftless_floor`, dropped at the end (and at the start,
-- if an interrupted run left it). Rows are sized like the pg bench's: ~100-byte rows, merge
-- states of 277 bytes and log entries of 206 bytes (the averages of a `--rows 1000000` run).
-- Every write kind inserts 200,000 rows in statements of 5,000, one transaction each (what
-- driftless's batches do), from a staging table prepared beforehand, so payload generation is
-- not timed.

\set ON_ERROR_STOP on
\set rows 200000
\set batch 5000
SET client_min_messages = notice;

DROP SCHEMA IF EXISTS driftless_floor CASCADE;
CREATE SCHEMA driftless_floor;
SET search_path = driftless_floor;

-- payloads, generated once (not timed)
CREATE UNLOGGED TABLE staging AS
SELECT i::bigint AS id,
       'item ' || i AS name,
       i * 1.5::float8 AS price,
       i || ' lorem ipsum dolor sit amet, consectetur adipiscing elit sed do' AS note,
       i::bigint AS stock,
       int8send(i) || '\x00'::bytea AS pk,
       substr(decode(repeat(md5(i::text), 18), 'hex'), 1, 277) AS state,
       substr(decode(repeat(md5((i + 1)::text), 13), 'hex'), 1, 206) AS change,
       (hashint8(i)::bigint & 262143) AS bucket,
       hashint8extended(i, 1) AS h
FROM generate_series(1, :rows) AS i;
CREATE INDEX ON staging (id);
ANALYZE staging;

-- the tables, as driftless's schema creates them (docs/postgres.md)
CREATE TABLE items (id bigint PRIMARY KEY, name text, price double precision, note text, stock bigint);
CREATE TABLE items_dest (LIKE items INCLUDING ALL);
CREATE TABLE pending (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tbl integer NOT NULL,
                      op smallint NOT NULL, k0 text);
CREATE TABLE row_states (tbl text NOT NULL, pk bytea NOT NULL, state bytea NOT NULL,
                         bucket bigint NOT NULL, h bigint NOT NULL, PRIMARY KEY (tbl, pk))
       WITH (fillfactor = 80);
CREATE INDEX row_states_bucket ON row_states (tbl, bucket);
CREATE TABLE log (seq bigint PRIMARY KEY, tbl text NOT NULL, pk bytea NOT NULL, change bytea NOT NULL);
CREATE TABLE results (kind text PRIMARY KEY, ms float8 NOT NULL, ord int NOT NULL);
CHECKPOINT;

CREATE PROCEDURE timed(kind text, ord int, body text, rows bigint, batch bigint)
LANGUAGE plpgsql AS $$
DECLARE
  started timestamptz;
  spent float8 := 0;
  lo bigint := 1;
BEGIN
  WHILE lo <= rows LOOP
    started := clock_timestamp();
    EXECUTE body USING lo, lo + batch - 1;
    COMMIT;
    spent := spent + extract(epoch FROM clock_timestamp() - started) * 1000;
    lo := lo + batch;
  END LOOP;
  INSERT INTO results VALUES (kind, spent, ord);
  COMMIT;
END $$;

-- 0. the baseline: a plain insert of the row
CALL timed('plain insert of the row (baseline)', 0,
  'INSERT INTO items SELECT id, name, price, note, stock FROM staging WHERE id BETWEEN $1 AND $2',
  :rows, :batch);
-- origin: what the capture trigger records, and stamping deleting it again
CALL timed('origin: pending record (trigger)', 1,
  'INSERT INTO pending (tbl, op, k0) SELECT 1, 1, id::text FROM staging WHERE id BETWEEN $1 AND $2',
  :rows, :batch);
CALL timed('origin: pending record deleted (stamping)', 2,
  'DELETE FROM pending WHERE seq BETWEEN $1 AND $2', :rows, :batch);
-- both ends: the merge state and the log entry
CALL timed('merge state (row_states, both ends)', 3,
  'INSERT INTO row_states SELECT ''items'', pk, state, bucket, h FROM staging WHERE id BETWEEN $1 AND $2',
  :rows, :batch);
CALL timed('log entry (both ends)', 4,
  'INSERT INTO log SELECT id, ''items'', pk, change FROM staging WHERE id BETWEEN $1 AND $2',
  :rows, :batch);
-- destination: the row, written with ON CONFLICT (a client may insert the same key)
CALL timed('destination: row upsert', 5,
  'INSERT INTO items_dest AS t SELECT id, name, price, note, stock FROM staging WHERE id BETWEEN $1 AND $2
   ON CONFLICT (id) DO UPDATE SET name = excluded.name, price = excluded.price, note = excluded.note, stock = excluded.stock',
  :rows, :batch);

\echo
\echo 'Row writes one replicated insert needs (microseconds per row, and in plain inserts):'
SELECT kind,
       round((ms * 1000 / :rows)::numeric, 2) AS us_per_row,
       round((ms / (SELECT ms FROM results WHERE ord = 0))::numeric, 2) AS plain_inserts
FROM results ORDER BY ord;

\echo 'The floor: origin = row + pending in and out + state + log; destination = upsert + state + log.'
\echo 'Compare it with native logical replication in plain inserts: the CPU the pg bench reports for'
\echo 'the client backend, the walsender and the apply worker, divided by the plain insert time.'
WITH r AS (SELECT ord, ms / (SELECT ms FROM results WHERE ord = 0) AS x FROM results)
SELECT round(sum(x) FILTER (WHERE ord IN (0, 1, 2, 3, 4))::numeric, 2) AS origin_plain_inserts,
       round(sum(x) FILTER (WHERE ord IN (5, 3, 4))::numeric, 2) AS destination_plain_inserts,
       round((sum(x) FILTER (WHERE ord IN (0, 1, 2, 3, 4))
              + sum(x) FILTER (WHERE ord IN (5, 3, 4)))::numeric, 2) AS floor_plain_inserts
FROM r;

RESET search_path;
DROP SCHEMA driftless_floor CASCADE;
