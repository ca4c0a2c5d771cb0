//! Installing driftless into a database and keeping it installed: the schema and its tables
//! (converting storage format 1), the node id and clock, the synced tables' ids, column ids and
//! capture triggers, the bootstrap of existing rows, and the catalog signature that notices DDL.

use crate::meta::{FORMAT, INSTALL_VERSION, install_sql};
use crate::schema::{
    APPLYING_SETTING, CAPTURE_TRIGGERS, NEW_ROWS, OLD_ROWS, OP_INSERT, ROW_CAPTURE_TRIGGER, Synced,
    TRUNCATE_TRIGGER, dollar_quote, introspect, quote_ident, quote_literal,
};
use crate::store::{Error, PostgresStore};
use driftless_core::{Clock, NodeId, Timestamp};
use driftless_store::{StoreError, TableSchema, random_node_id};
use std::sync::Arc;

impl<C: Clock> PostgresStore<C> {
    pub(crate) fn install(
        &mut self,
        wanted: Option<NodeId>,
        schema_name: &str,
    ) -> Result<(), StoreError> {
        // The schema is created outside the transaction helper (which expects it to exist).
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
                &[&schema_name],
            )
            .map_err(crate::schema::db)?
            .is_some();
        if !exists {
            self.client
                .batch_execute(&format!(
                    "SELECT pg_catalog.pg_advisory_lock({key}); \
                     CREATE SCHEMA IF NOT EXISTS {ds}; \
                     SELECT pg_catalog.pg_advisory_unlock({key});",
                    key = self.lock_key,
                    ds = self.ds
                ))
                .map_err(crate::schema::db)?;
        }
        // Which configured tables exist (read outside the transaction: a snapshot must not be
        // taken before the locks).
        let mut install_locks = Vec::new();
        for config in &self.configs {
            let qualified = format!(
                "{}.{}",
                quote_ident(&self.table_schema),
                quote_ident(config.name.as_str())
            );
            let exists = self
                .client
                .query_one(
                    "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                    &[&qualified],
                )
                .map_err(crate::schema::db)?
                .get::<_, bool>(0);
            if exists {
                install_locks.push(qualified);
            }
        }
        self.install_locks = install_locks;
        let result = self.write_tx(|store| {
            let installed = store
                .client
                .query_one(
                    &format!(
                        "SELECT pg_catalog.to_regclass('{}.meta') IS NOT NULL",
                        store.ds.replace('\'', "''")
                    ),
                    &[],
                )?
                .get::<_, bool>(0);
            let version = if installed {
                store.meta.get_i64(&mut store.client, "install_version")?
            } else {
                None
            };
            let format = if installed {
                store.meta.get_i64(&mut store.client, "format")?
            } else {
                None
            };
            if version.is_some_and(|v| v > INSTALL_VERSION) || format.is_some_and(|f| f > FORMAT) {
                return Err(StoreError::Schema {
                    table: format!("{}.meta", store.ds_name),
                    reason: format!(
                        "this database was set up by a newer driftless (install version {}, \
                         storage format {}); this one reads install versions up to \
                         {INSTALL_VERSION} and storage formats 1 and {FORMAT}: run the newer release",
                        version.unwrap_or(0),
                        format.unwrap_or(1)
                    ),
                }
                .into());
            }
            // storage format 1 kept `row_states` and `log`: converted below, in this transaction
            let legacy = installed
                && store
                    .client
                    .query_one(
                        &format!(
                            "SELECT pg_catalog.to_regclass('{}.row_states') IS NOT NULL",
                            store.ds.replace('\'', "''")
                        ),
                        &[],
                    )?
                    .get::<_, bool>(0);
            if version != Some(INSTALL_VERSION) {
                store.client.batch_execute(&install_sql(&store.ds))?;
                store
                    .meta
                    .set_i64(&mut store.client, "install_version", INSTALL_VERSION)?;
            }
            store.node = match store.meta.get_blob(&mut store.client, "node_id")? {
                Some(bytes) => {
                    let bytes: [u8; 16] = bytes
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("node_id is not 16 bytes".into()))?;
                    let found = NodeId::from_bytes(bytes);
                    if let Some(expected) = wanted.filter(|w| *w != found) {
                        return Err(StoreError::WrongNode { expected, found }.into());
                    }
                    found
                }
                None => {
                    let id = match wanted {
                        Some(id) => id,
                        None => random_node_id()
                            .map_err(|e| StoreError::Database(format!("OS random source: {e}")))?,
                    };
                    store
                        .meta
                        .set_blob(&mut store.client, "node_id", &id.to_bytes())?;
                    id
                }
            };
            if let Some(last) = store.meta.get_i64(&mut store.client, "hlc")? {
                store
                    .hlc
                    .observe_persisted(Timestamp::from_u64(last as u64));
                store.hlc_saved = last as u64;
            }
            store.load_nodes()?;
            // (a retried attempt bootstraps again: the failed one rolled back)
            store.refresh_schemas_in_tx(true)?;
            if legacy {
                crate::upgrade::convert(store)?;
            }
            store.meta.set_i64(&mut store.client, "format", FORMAT)?;
            Ok(())
        });
        self.install_locks.clear();
        result
    }

    /// Re-reads the synced tables' schemas and (re)installs the triggers where they differ.
    /// With `bootstrap`, tables seen for the first time get their existing rows queued as local
    /// inserts.
    pub(crate) fn refresh_schemas_in_tx(&mut self, bootstrap: bool) -> Result<(), Error> {
        let mut schemas = Vec::with_capacity(self.configs.len());
        let mut synced = Vec::with_capacity(self.configs.len());
        let configs = self.configs.clone();
        for config in &configs {
            let (schema, columns, oid, identity_always) =
                introspect(&mut self.client, &self.table_schema, config)?;
            let name = schema.name.as_str();
            self.client.execute(
                &format!(
                    "INSERT INTO {}.tables (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                    self.ds
                ),
                &[&name],
            )?;
            let id: i32 = self
                .client
                .query_one(
                    &format!("SELECT id FROM {}.tables WHERE name = $1", self.ds),
                    &[&name],
                )?
                .get(0);
            let column_ids = self.column_ids(id, &schema)?;
            let table = Synced::new(
                id,
                schema.clone(),
                columns,
                oid,
                identity_always,
                &self.table_schema,
                column_ids,
            );
            self.install_triggers(&table)?;
            let installed_key = format!("installed:{}", schema.name);
            if bootstrap
                && self
                    .meta
                    .get_i64(&mut self.client, &installed_key)?
                    .is_none()
            {
                let sql = self.bootstrap_sql(&table);
                self.client.batch_execute(&sql)?;
                self.meta.set_i64(&mut self.client, &installed_key, 1)?;
            }
            synced.push(Arc::new(table));
            schemas.push(schema);
        }
        self.schemas = schemas;
        self.synced = synced;
        // (the served changes carry the schema they were made under)
        self.tail.clear();
        // prepared statements may name columns that changed
        self.statements.clear();
        self.catalog_signature = self.read_catalog_signature()?;
        Ok(())
    }

    /// The stable ids of a table's value columns, assigning new ones (never reused) to columns
    /// seen for the first time.
    fn column_ids(&mut self, table_id: i32, schema: &TableSchema) -> Result<Vec<u32>, Error> {
        let insert = format!(
            "INSERT INTO {ds}.columns (tbl, id, name) SELECT $1, coalesce(max(id) + 1, 0), $2 \
             FROM {ds}.columns WHERE tbl = $1 ON CONFLICT DO NOTHING",
            ds = self.ds
        );
        let select = format!(
            "SELECT id FROM {}.columns WHERE tbl = $1 AND name = $2",
            self.ds
        );
        let mut out = Vec::new();
        for column in schema.value_columns() {
            let name = column.name.as_str();
            self.client.execute(&insert, &[&table_id, &name])?;
            let id: i32 = self.client.query_one(&select, &[&table_id, &name])?.get(0);
            out.push(u32::try_from(id).map_err(|_| {
                StoreError::Corrupt(format!("column id {id} of {} is negative", schema.name))
            })?);
        }
        Ok(out)
    }

    /// Reloads the node interner from the `nodes` table (at open, when another process added
    /// nodes, and after a rolled-back transaction that may have interned nodes it never stored).
    pub(crate) fn load_nodes(&mut self) -> Result<(), Error> {
        let sql = format!("SELECT id, node FROM {}.nodes", self.ds);
        let mut stored = Vec::new();
        for row in self.client.query(&sql, &[])? {
            let id: i32 = row.get(0);
            let bytes: Vec<u8> = row.get(1);
            let bytes: [u8; 16] = bytes
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("node {id} is not 16 bytes")))?;
            let id = u32::try_from(id)
                .map_err(|_| StoreError::Corrupt(format!("node index {id} out of range")))?;
            stored.push((id, NodeId::from_bytes(bytes)));
        }
        self.nodes = driftless_store::rowmeta::NodeInterner::from_stored(stored)
            .map_err(StoreError::Corrupt)?;
        Ok(())
    }

    /// Installs the capture function and triggers unless exactly these are already installed
    /// (replacing a trigger takes a lock that blocks the table's writers).
    pub(crate) fn install_triggers(&mut self, table: &Synced) -> Result<(), Error> {
        let relkind: String = self
            .client
            .query_one(
                "SELECT relkind::pg_catalog.text FROM pg_catalog.pg_class WHERE oid = $1",
                &[&table.oid],
            )?
            .get(0);
        let partitioned = relkind == "p";
        let body = if partitioned {
            &table.row_function_body
        } else {
            &table.function_body
        }
        .replace("PENDING", &format!("{}.pending", self.ds));
        let function = format!("{}.{}", self.ds, quote_ident(&table.function_name));
        let existing: Option<String> = self
            .client
            .query_opt(
                "SELECT p.prosrc FROM pg_catalog.pg_proc p
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = $1 AND p.proname = $2",
                &[&self.ds_name, &table.function_name],
            )?
            .map(|r| r.get(0));
        if existing.as_deref() != Some(body.as_str()) {
            let tag = dollar_quote(&body);
            // SECURITY DEFINER: client roles need no privilege on driftless's schema; with a
            // pinned search_path and schema-qualified names, as PostgreSQL recommends.
            self.client.batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql \
                 SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {tag}{body}{tag}; \
                 REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;"
            ))?;
        }
        let triggers: Vec<(String, String)> = self
            .client
            .query(
                "SELECT tgname::pg_catalog.text, tgenabled::pg_catalog.text FROM pg_catalog.pg_trigger
                 WHERE tgrelid = $1 AND NOT tgisinternal AND tgname::pg_catalog.text LIKE 'driftless%'",
                &[&table.oid],
            )?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let when = format!(
            "WHEN (pg_catalog.current_setting({}, true) IS DISTINCT FROM 'on')",
            quote_literal(APPLYING_SETTING)
        );
        let mut wanted: Vec<(&str, String)> = if partitioned {
            vec![(
                ROW_CAPTURE_TRIGGER,
                format!(
                    "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW {when} \
                     EXECUTE FUNCTION {function}()",
                    quote_ident(ROW_CAPTURE_TRIGGER),
                    table.qualified
                ),
            )]
        } else {
            CAPTURE_TRIGGERS
                .iter()
                .map(|(name, op)| {
                    let referencing = match *op {
                        "INSERT" => format!("NEW TABLE AS {NEW_ROWS}"),
                        "UPDATE" => format!("OLD TABLE AS {OLD_ROWS} NEW TABLE AS {NEW_ROWS}"),
                        _ => format!("OLD TABLE AS {OLD_ROWS}"),
                    };
                    (
                        *name,
                        format!(
                            "CREATE TRIGGER {} AFTER {op} ON {} REFERENCING {referencing} \
                         FOR EACH STATEMENT {when} EXECUTE FUNCTION {function}()",
                            quote_ident(name),
                            table.qualified
                        ),
                    )
                })
                .collect()
        };
        wanted.push((
            TRUNCATE_TRIGGER,
            format!(
                "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT {when} \
                 EXECUTE FUNCTION {}.refuse_truncate()",
                quote_ident(TRUNCATE_TRIGGER),
                table.qualified,
                self.ds
            ),
        ));
        for (name, _) in &triggers {
            if !wanted.iter().any(|(w, _)| w == name) {
                // an older version of driftless's trigger
                self.client.batch_execute(&format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    quote_ident(name),
                    table.qualified
                ))?;
            }
        }
        for (name, sql) in &wanted {
            match triggers.iter().find(|(n, _)| n == name) {
                Some((_, enabled)) if enabled == "O" || enabled == "A" => {}
                Some(_) => {
                    // disabled by someone: capture would silently stop, so put it back
                    self.client.batch_execute(&format!(
                        "ALTER TABLE {} ENABLE TRIGGER {}",
                        table.qualified,
                        quote_ident(name)
                    ))?;
                }
                None => self.client.batch_execute(sql)?,
            }
        }
        Ok(())
    }

    /// SQL that queues every existing row of a table as a local insert (bootstrap at install).
    fn bootstrap_sql(&self, table: &Synced) -> String {
        let targets: String = (0..table.keys.len()).map(|i| format!(", k{i}")).collect();
        let sources: String = table
            .keys
            .iter()
            .map(|c| format!(", {}", c.kind.trigger_key_expr(&format!("t.{}", c.quoted))))
            .collect();
        format!(
            "INSERT INTO {}.pending (tbl, op{targets}) SELECT {}, {OP_INSERT}{sources} FROM {} AS t",
            self.ds, table.id, table.qualified
        )
    }

    /// A signature of the catalog rows describing the synced tables (columns, primary key,
    /// triggers): any DDL on them changes it. Checked at the start of every write transaction,
    /// like the SQLite adapter's `PRAGMA schema_version`.
    fn read_catalog_signature(&mut self) -> Result<String, Error> {
        Ok(self.read_catalog_signature_and_dead_letters()?.0)
    }

    /// The catalog signature, with whether any dead letter holds a change (so a batch knows
    /// whether to retry the dead letters of the rows it writes): one round trip, paid by
    /// every write transaction.
    pub(crate) fn read_catalog_signature_and_dead_letters(
        &mut self,
    ) -> Result<(String, bool, i64), Error> {
        let names: Vec<String> = self
            .configs
            .iter()
            .map(|c| c.name.as_str().to_owned())
            .collect();
        let sql = format!(
            "SELECT coalesce(pg_catalog.string_agg(x, ';' ORDER BY x), ''),
              EXISTS (SELECT 1 FROM {ds}.dead_letters WHERE change IS NOT NULL),
              (SELECT count(*) FROM {ds}.nodes) FROM (
              SELECT c.oid::pg_catalog.text || ':' || c.xmin::pg_catalog.text || ':' ||
                coalesce((SELECT pg_catalog.string_agg(a.attnum::pg_catalog.text || '.' || a.xmin::pg_catalog.text, ',' ORDER BY a.attnum)
                          FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0), '') || ':' ||
                coalesce((SELECT pg_catalog.string_agg(i.indexrelid::pg_catalog.text || '.' || i.xmin::pg_catalog.text, ',' ORDER BY i.indexrelid)
                          FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), '') || ':' ||
                coalesce((SELECT pg_catalog.string_agg(t.tgname::pg_catalog.text || '.' || t.tgenabled::pg_catalog.text || '.' || t.xmin::pg_catalog.text, ',' ORDER BY t.tgname)
                          FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal), '') AS x
              FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = ANY($2)) AS s",
            ds = self.ds
        );
        let stmt = self.stmt(&sql)?;
        let row = self
            .client
            .query_one(&stmt, &[&self.table_schema, &names])?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }
}
