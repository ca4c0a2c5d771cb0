//! The `PostgresStore` type: connecting, installing capture, and the transaction helper every
//! operation goes through (serialized against other driftless sessions, REPEATABLE READ against
//! the clients, retried on serialization failures).

use crate::meta::{FORMAT, INSTALL_VERSION, Meta, install_sql};
use crate::schema::{
    APPLYING_SETTING, CAPTURE_TRIGGERS, NEW_ROWS, OLD_ROWS, OP_INSERT, ROW_CAPTURE_TRIGGER, Synced,
    TRUNCATE_TRIGGER, dollar_quote, introspect, quote_ident, quote_literal,
};
use driftless_core::{Clock, Hlc, NodeId, PrimaryKey, RowState, TableName, Timestamp};
use driftless_store::{StoreError, SystemClock, TableConfig, TableSchema, random_node_id};
use postgres::error::SqlState;
use postgres::{Client, NoTls, Statement};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Attempts of one operation that only rely on REPEATABLE READ to detect concurrent client
/// writes (no blocking of clients); later attempts lock the synced tables first.
pub const TX_OPTIMISTIC_ATTEMPTS: u32 = 3;
/// Attempts of one operation before it fails (the caller retries later).
pub const TX_ATTEMPTS_MAX: u32 = 30;

/// Settings of a PostgreSQL replica.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The tables to sync, with their merge rules.
    pub tables: Vec<TableConfig>,
    /// A remote change stamped further ahead of our wall clock than this is held, not applied.
    pub max_clock_offset: Duration,
    /// Node id to use when installing into a database for the first time (random if `None`).
    /// If the database already has one, it must match.
    pub node_id: Option<NodeId>,
    /// The schema holding the synced tables.
    pub table_schema: String,
    /// The schema driftless keeps its metadata, log and triggers' functions in (created if
    /// missing, which needs CREATE on the database; or pre-create it for the driftless role).
    pub driftless_schema: String,
    /// How long an apply that fell back to locking the synced tables waits for the lock before
    /// giving up for this attempt (so a long client transaction cannot stall every writer).
    pub lock_timeout: Duration,
}

impl PostgresOptions {
    pub fn new(tables: Vec<TableConfig>) -> Self {
        PostgresOptions {
            tables,
            max_clock_offset: Duration::from_secs(60),
            node_id: None,
            table_schema: "public".into(),
            driftless_schema: "driftless".into(),
            lock_timeout: Duration::from_secs(2),
        }
    }
}

/// Errors from opening a store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    /// The server could not be reached or went away (refused, reset, shut down, too many
    /// connections): worth trying again, unlike a refused login or a missing database.
    #[error("PostgreSQL is unreachable: {0}")]
    Unreachable(String),
    #[error("cannot install driftless into the database: {0}")]
    Install(StoreError),
    #[error("no tables configured: list at least one table to sync")]
    NoTables,
    #[error("table {0} is configured twice")]
    DuplicateTable(TableName),
}

/// Errors inside an operation: a database error keeps its SQLSTATE so the transaction helper
/// can tell a retryable serialization failure from a real failure.
#[derive(Debug)]
pub(crate) enum Error {
    Pg(postgres::Error),
    Store(StoreError),
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        Error::Pg(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl From<driftless_core::ClockError> for Error {
    fn from(e: driftless_core::ClockError) -> Self {
        Error::Store(e.into())
    }
}

impl Error {
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Error::Pg(e) => e.code(),
            Error::Store(_) => None,
        }
    }

    /// A serialization failure, deadlock or lock timeout: the transaction can simply run again.
    pub fn is_retryable(&self) -> bool {
        self.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE
        })
    }

    /// A problem with the data written (constraint violation, value out of range or not parsable
    /// by the column's type): the change is dead-lettered.
    pub fn is_data_problem(&self) -> bool {
        self.code()
            .is_some_and(|c| c.code().starts_with("23") || c.code().starts_with("22"))
    }

    /// The error as text for a dead letter or message.
    pub fn describe(&self) -> String {
        match self {
            Error::Pg(e) => describe(e),
            Error::Store(e) => e.to_string(),
        }
    }

    pub fn into_store(self) -> StoreError {
        match self {
            Error::Pg(e) if is_unreachable(&e) => StoreError::Unavailable(describe(&e)),
            Error::Pg(e) => StoreError::Database(describe(&e)),
            Error::Store(e) => e,
        }
    }
}

impl OpenError {
    /// Whether opening may succeed if tried again later (the server was down or went away).
    pub fn is_transient(&self) -> bool {
        matches!(self, OpenError::Unreachable(_))
    }
}

/// Whether a connection attempt failed because the server is not (yet) there, rather than
/// because it refused us: no server answer at all, or the SQLSTATE classes of a server shutting
/// down (57P01-57P03) or out of connections (53300).
pub(crate) fn is_unreachable(e: &postgres::Error) -> bool {
    match e.code() {
        Some(code) => matches!(code.code(), "57P01" | "57P02" | "57P03" | "53300"),
        // a socket error (refused, reset, timed out) or a closed connection; not a bad
        // connection string, a refused login or TLS trouble
        None => {
            e.is_closed()
                || std::error::Error::source(e)
                    .is_some_and(|cause| cause.downcast_ref::<std::io::Error>().is_some())
        }
    }
}

/// A readable description of a database error, with PostgreSQL's detail (e.g. the key of a
/// unique violation).
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut text = format!("{} (SQLSTATE {})", d.message(), d.code().code());
            if let Some(detail) = d.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => e.to_string(),
    }
}

/// A row's merge state as loaded inside the current transaction.
#[derive(Debug, Clone)]
pub(crate) struct CachedState {
    pub state: RowState,
    /// Its item hash when loaded (`None`: never seen), to keep bucket fingerprints in step.
    pub old_hash: Option<i64>,
    pub dirty: bool,
    /// When it was last changed in this transaction (rows take sequence numbers in this order).
    pub touched: u64,
    /// The user row as the table showed it when the state was loaded or stamped: a value equal
    /// to the table's need not be kept in the metadata (see `rowio::flush`).
    pub table_row: Option<crate::rowio::UserRow>,
}

/// What the current write transaction has buffered: states loaded and changed, and the changes
/// it made (kept only for the fault-injection harness's history). Flushed with a few multi-row
/// statements just before COMMIT.
#[derive(Debug, Default)]
pub(crate) struct TxState {
    pub states: HashMap<(TableName, PrimaryKey), CachedState>,
    pub touches: u64,
    pub history: Vec<(TableName, PrimaryKey, Vec<u8>)>,
    /// What flushing changed in the top-level fingerprints, per table (XOR deltas)...
    pub top_deltas: HashMap<TableName, HashMap<usize, i64>>,
    /// ... and `fp_gen` before and after this transaction's bump (`None`: no state written).
    pub fp_gen: Option<(i64, i64)>,
}

/// A table's top-level reconciliation fingerprints as of `fp_gen` = `generation`.
#[derive(Debug, Clone)]
pub(crate) struct TopFingerprints {
    pub generation: i64,
    pub tops: Vec<i64>,
}

/// A PostgreSQL replica: the user's database with driftless's capture and metadata installed.
pub struct PostgresStore<C: Clock = SystemClock> {
    pub(crate) client: Conn,
    pub(crate) url: String,
    pub(crate) node: NodeId,
    pub(crate) hlc: Hlc<C>,
    pub(crate) configs: Vec<TableConfig>,
    pub(crate) schemas: Vec<TableSchema>,
    pub(crate) synced: Vec<Arc<Synced>>,
    /// Quoted schema names.
    pub(crate) ds: String,
    pub(crate) ds_name: String,
    pub(crate) table_schema: String,
    pub(crate) meta: Meta,
    pub(crate) lock_timeout: Duration,
    /// Key of the session advisory lock that serializes driftless's write transactions on this
    /// database (so log sequence numbers commit in order).
    pub(crate) lock_key: i64,
    pub(crate) statements: HashMap<String, Statement>,
    /// The catalog rows of the synced tables when their schemas were last read.
    pub(crate) catalog_signature: String,
    pub(crate) dead_letters_present: bool,
    pub(crate) tx: TxState,
    /// Node ids interned to small integers for the row metadata (`nodes` table).
    pub(crate) nodes: driftless_store::rowmeta::NodeInterner,
    /// Top-level fingerprints per table, kept up to date by this process's own commits and
    /// rebuilt from `row_states` when `fp_gen` shows that another process wrote (reconcile.rs).
    pub(crate) top_fingerprints: HashMap<TableName, TopFingerprints>,
    /// The HLC value last persisted.
    pub(crate) hlc_saved: u64,
    /// Transactions retried because of a conflict with a concurrent client (for tests/metrics).
    pub(crate) tx_retries: u64,
    /// Pending records deleted by stamping since `pending` was last vacuumed (see
    /// `capture::PENDING_VACUUM_AFTER`).
    pub(crate) pending_removed: u64,
    /// False while installing (driftless's tables may not exist yet).
    pub(crate) installed: bool,
    /// While installing: the synced tables that exist, locked against writers before the
    /// install transaction takes its snapshot, so no row can commit between the bootstrap's
    /// read of existing rows and the triggers taking over.
    install_locks: Vec<String>,
}

impl<C: Clock> std::fmt::Debug for PostgresStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("node", &self.node)
            .field("schema", &self.ds)
            .field("tables", &self.configs.len())
            .finish_non_exhaustive()
    }
}

impl PostgresStore<SystemClock> {
    /// Connects to `url` (a libpq-style connection string, e.g.
    /// `host=127.0.0.1 user=driftless dbname=app`) and on first use installs driftless.
    pub fn open(url: &str, options: PostgresOptions) -> Result<Self, OpenError> {
        Self::open_with_clock(url, options, SystemClock)
    }
}

/// FNV-1a of the schema name: the advisory lock key of one driftless installation.
fn lock_key(schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"driftless:".iter().chain(schema.as_bytes()) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// The session settings driftless relies on: a pinned `search_path` (every name driftless uses
/// is schema-qualified anyway) and fixed date/time output.
const SESSION_SETTINGS: &str = "SET search_path = pg_catalog, pg_temp; SET TimeZone = 'UTC'; \
     SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; \
     SET application_name = 'driftless'";

pub(crate) fn connect(url: &str) -> Result<Conn, postgres::Error> {
    let mut client = Client::connect(url, NoTls)?;
    client.batch_execute(SESSION_SETTINGS)?;
    Ok(Conn(Some(client)))
}

/// The connection. The `postgres` crate's client drives its socket on a small runtime of its
/// own and blocks on it, also when dropped, which panics on a thread that is running an async
/// runtime (a tokio worker). So the client is dropped on a thread of its own: a store may be
/// dropped anywhere, e.g. by the last task holding the node's store handle.
pub(crate) struct Conn(Option<Client>);

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0
            .as_ref()
            .expect("the client is only taken when dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        self.0
            .as_mut()
            .expect("the client is only taken when dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("driftless-pg-close".into())
                .spawn(move || drop(client))
                .map(|t| t.join());
        }
    }
}

impl<C: Clock> PostgresStore<C> {
    /// Opens with an injected wall clock (tests and simulations).
    pub fn open_with_clock(
        url: &str,
        options: PostgresOptions,
        clock: C,
    ) -> Result<Self, OpenError> {
        if options.tables.is_empty() {
            return Err(OpenError::NoTables);
        }
        for (i, t) in options.tables.iter().enumerate() {
            if options.tables[..i].iter().any(|o| o.name == t.name) {
                return Err(OpenError::DuplicateTable(t.name.clone()));
            }
        }
        let client = connect(url).map_err(|e| {
            if is_unreachable(&e) {
                OpenError::Unreachable(describe(&e))
            } else {
                OpenError::Connect(describe(&e))
            }
        })?;
        let ds = quote_ident(&options.driftless_schema);
        let mut store = PostgresStore {
            client,
            url: url.to_owned(),
            node: NodeId::default(),
            hlc: Hlc::new(clock, options.max_clock_offset),
            configs: options.tables,
            schemas: Vec::new(),
            synced: Vec::new(),
            meta: Meta::new(&ds),
            ds,
            ds_name: options.driftless_schema.clone(),
            table_schema: options.table_schema,
            lock_timeout: options.lock_timeout,
            lock_key: lock_key(&options.driftless_schema),
            statements: HashMap::new(),
            catalog_signature: String::new(),
            dead_letters_present: true,
            tx: TxState::default(),
            nodes: Default::default(),
            top_fingerprints: HashMap::new(),
            hlc_saved: 0,
            tx_retries: 0,
            pending_removed: 0,
            installed: false,
            install_locks: Vec::new(),
        };
        let schema_name = options.driftless_schema.clone();
        store
            .install(options.node_id, &schema_name)
            .map_err(|e| match e {
                // the connection dropped mid-install (the install is one transaction, so
                // nothing half-done stays behind): the caller may simply try again
                StoreError::Unavailable(reason) => OpenError::Unreachable(reason),
                other => OpenError::Install(other),
            })?;
        store.installed = true;
        Ok(store)
    }

    fn install(&mut self, wanted: Option<NodeId>, schema_name: &str) -> Result<(), StoreError> {
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
    fn install_triggers(&mut self, table: &Synced) -> Result<(), Error> {
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
    fn read_catalog_signature_and_dead_letters(&mut self) -> Result<(String, bool, i64), Error> {
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

    /// A prepared statement for `sql`, prepared once per connection (and per schema: DDL on the
    /// synced tables clears the cache).
    pub(crate) fn stmt(&mut self, sql: &str) -> Result<Statement, Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Reconnects if the connection was lost (e.g. the server restarted).
    pub(crate) fn ensure_connected(&mut self) -> Result<(), StoreError> {
        if self.client.is_closed() {
            self.client = connect(&self.url).map_err(|e| {
                if is_unreachable(&e) {
                    StoreError::Unavailable(describe(&e))
                } else {
                    StoreError::Database(describe(&e))
                }
            })?;
            self.statements.clear();
        }
        Ok(())
    }

    /// Runs `body` in one write transaction: REPEATABLE READ, with driftless's own writes
    /// marked (`SET LOCAL driftless.applying`) so the capture triggers skip them, serialized
    /// against other driftless sessions on this database by a session advisory lock, and with
    /// the buffered states and log entries flushed before COMMIT. Picks up DDL on the synced
    /// tables first.
    ///
    /// A concurrent client write to a row this transaction also writes makes PostgreSQL fail it
    /// with a serialization error; it then runs again from the start (stamping that client
    /// write first). After [`TX_OPTIMISTIC_ATTEMPTS`] such failures, attempts lock the synced
    /// tables against client writes first (bounded by `lock_timeout`), so an apply cannot be
    /// starved by busy clients. See docs/postgres.md.
    pub(crate) fn write_tx<T>(
        &mut self,
        mut body: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<T, StoreError> {
        self.ensure_connected()?;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let lock_tables = attempt > TX_OPTIMISTIC_ATTEMPTS;
            match self.run_tx_once(&mut body, lock_tables) {
                Ok(value) => return Ok(value),
                Err(e) if e.is_retryable() && attempt < TX_ATTEMPTS_MAX => {
                    self.tx_retries += 1;
                    // brief, growing pause: lets the conflicting client transaction finish
                    std::thread::sleep(Duration::from_millis(u64::from(attempt.min(20))));
                }
                Err(e) => {
                    if self.client.is_closed() {
                        let _ = self.ensure_connected();
                    }
                    return Err(e.into_store());
                }
            }
        }
    }

    fn run_tx_once<T>(
        &mut self,
        body: &mut impl FnMut(&mut Self) -> Result<T, Error>,
        lock_tables: bool,
    ) -> Result<T, Error> {
        self.tx = TxState::default();
        // Two round trips: the lock must be held before the transaction's snapshot is taken.
        self.client.batch_execute(&format!(
            "SELECT pg_catalog.pg_advisory_lock({})",
            self.lock_key
        ))?;
        if let Err(e) = self.client.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL {APPLYING_SETTING} = 'on';"
        )) {
            self.abort_tx();
            return Err(e.into());
        }
        let result = (|| {
            if !self.install_locks.is_empty() {
                // first statement after BEGIN: the snapshot is taken after the locks
                self.client.batch_execute(&format!(
                    "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                    self.install_locks.join(", ")
                ))?;
            }
            if lock_tables {
                let tables: Vec<String> = self.synced.iter().map(|s| s.qualified.clone()).collect();
                self.client.batch_execute(&format!(
                    "SET LOCAL lock_timeout = {}; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE; \
                     RESET lock_timeout;",
                    self.lock_timeout.as_millis().max(1),
                    tables.join(", ")
                ))?;
            }
            if !self.installed {
                let value = body(self)?;
                self.flush()?;
                return Ok(value);
            }
            let (signature, dead_letters_present, nodes) =
                self.read_catalog_signature_and_dead_letters()?;
            self.dead_letters_present = dead_letters_present;
            if nodes != self.nodes.len() as i64 {
                // another process (an admin command, a second node) interned nodes
                self.load_nodes()?;
            }
            if signature != self.catalog_signature {
                self.refresh_schemas_in_tx(false)?;
            }
            let value = body(self)?;
            self.flush()?;
            Ok(value)
        })();
        match result {
            Ok(value) => {
                let commit = self.client.batch_execute(&format!(
                    "COMMIT; SELECT pg_catalog.pg_advisory_unlock({});",
                    self.lock_key
                ));
                match commit {
                    Ok(()) => {
                        self.committed_fingerprints();
                        Ok(value)
                    }
                    Err(e) => {
                        self.abort_tx();
                        Err(e.into())
                    }
                }
            }
            Err(e) => {
                self.abort_tx();
                Err(e)
            }
        }
    }

    /// Runs `body` in one read-only REPEATABLE READ snapshot, so the row metadata and the user
    /// rows it reads values from agree. If local writes are waiting to be stamped (the table
    /// holds values newer than their metadata), stamps them (a backlog in bounded transactions)
    /// and runs `body` in a write transaction that stamps what is left first (and flushes, so
    /// `body` reads what stamping wrote).
    pub(crate) fn read_snapshot<T>(
        &mut self,
        mut body: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<T, StoreError> {
        self.ensure_connected()?;
        let quiet = (|| -> Result<bool, Error> {
            self.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {}.pending)", self.ds);
            let stmt = self.stmt(&sql)?;
            Ok(self.client.query_one(&stmt, &[])?.get(0))
        })();
        match quiet {
            Ok(true) => {
                let result = body(self);
                let end = self.client.batch_execute("COMMIT");
                let value = result.map_err(Error::into_store)?;
                end.map_err(|e| Error::from(e).into_store())?;
                Ok(value)
            }
            other => {
                let _ = self.client.batch_execute("ROLLBACK");
                other.map_err(Error::into_store)?;
                // A backlog is stamped in bounded transactions first (memory stays bounded, and
                // each commits as it goes); what arrives meanwhile is stamped with the read.
                while self.write_tx(|store| {
                    let mut captured = driftless_store::CaptureReport::default();
                    store.capture_in_tx(driftless_store::CAPTURE_BATCH_ROWS_MAX, &mut captured)
                })? == driftless_store::CAPTURE_BATCH_ROWS_MAX
                {}
                self.write_tx(|store| {
                    let mut captured = driftless_store::CaptureReport::default();
                    store.capture_all_in_tx(&mut captured)?;
                    store.flush()?;
                    body(store)
                })
            }
        }
    }

    /// Best effort: the transaction may already be gone, the connection too.
    fn abort_tx(&mut self) {
        self.tx = TxState::default();
        self.nodes.roll_back();
        let _ = self.client.batch_execute("ROLLBACK");
        let _ = self.client.batch_execute(&format!(
            "SELECT pg_catalog.pg_advisory_unlock({})",
            self.lock_key
        ));
    }

    /// A synced table by name.
    pub(crate) fn synced(&self, table: &TableName) -> Option<Arc<Synced>> {
        self.synced
            .iter()
            .find(|s| &s.schema.name == table)
            .cloned()
    }

    /// Milliseconds since the epoch for ledger timestamps.
    pub(crate) fn now_ms(&self) -> u64 {
        self.hlc.clock().now_ms()
    }

    /// The HLC (tests and the node read it; the store owns it).
    pub fn hlc(&self) -> &Hlc<C> {
        &self.hlc
    }

    pub fn hlc_mut(&mut self) -> &mut Hlc<C> {
        &mut self.hlc
    }

    /// Write transactions run again because a concurrent client wrote the same rows.
    pub fn transaction_retries(&self) -> u64 {
        self.tx_retries
    }

    /// The underlying connection, for inspection in tests and tools (do not write synced
    /// tables through it: its writes are not captured while a driftless transaction is open).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }
}
