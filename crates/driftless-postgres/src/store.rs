//! The `PostgresStore` type: its options, errors, connection and per-transaction caches, and
//! opening (installing is in `install.rs`, the transaction helpers in `tx.rs`).

use crate::meta::Meta;
use crate::schema::{Synced, quote_ident};
use driftless_core::{Clock, Hlc, NodeId, PrimaryKey, RowState, TableName};
use driftless_store::{StoreError, SystemClock, TableConfig, TableSchema};
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
    /// Its sequence number when loaded or last flushed (`None`: never stored).
    pub seq: Option<i64>,
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
    /// What the flushed rows add to the in-memory tail of the log once this commits...
    pub tail: Vec<driftless_store::tail::TailChunk>,
    /// ... if by then every local write visible to this transaction was stamped (see
    /// `capture_in_tx`); otherwise a state may show a waiting write's value with an older
    /// version, which must never be served (the stored rows are only read once nothing waits).
    pub drained: bool,
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
    /// The rows this process committed last, as served (see `tail.rs`).
    pub(crate) tail: driftless_store::tail::Tail,
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
    pub(crate) install_locks: Vec<String>,
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
            tail: Default::default(),
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
