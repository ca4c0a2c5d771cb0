//! Node configuration: the TOML file format, its validation, and resolution into the values
//! the node runs with. Every key is documented in docs/config.md; unknown keys are refused.

use driftless_core::{ColumnKind, ColumnName, NodeId, TableName};
use driftless_store::TableConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub store: StoreSection,
    #[serde(default)]
    pub tables: Vec<TableSection>,
    pub listen: Option<ListenSection>,
    #[serde(default)]
    pub peers: Vec<PeerSection>,
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub sync: SyncSection,
}

/// `[node]`: who this node is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Unique name of the node in the fleet (letters, digits, `.`, `_`, `-`). The node id is
    /// derived from it, so every node can name priority nodes in its config.
    pub name: String,
    /// driftless's own state directory (created if missing).
    pub data_dir: PathBuf,
    /// A remote change stamped further ahead of the local wall clock is held, not applied.
    #[serde(default = "default_max_clock_offset_ms")]
    pub max_clock_offset_ms: u64,
}

fn default_max_clock_offset_ms() -> u64 {
    60_000
}

/// `[store]`: the local data store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// SQLite database file.
    pub path: Option<PathBuf>,
    /// PostgreSQL connection string (`postgres://user@host/db` or `host=... dbname=...`).
    pub url: Option<String>,
    /// PostgreSQL: the schema holding the synced tables.
    pub schema: Option<String>,
    /// PostgreSQL: the schema driftless keeps its metadata in.
    pub driftless_schema: Option<String>,
}

/// Where the node's data lives, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        url: String,
        schema: String,
        driftless_schema: String,
    },
}

impl StoreLocation {
    /// For display: the SQLite path, or the PostgreSQL URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Sqlite { path } => path.display().to_string(),
            StoreLocation::Postgres { url, .. } => redact_password(url),
        }
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`; `password=secret` -> `password=***`.
pub fn redact_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some(("password", _)) => "password=***".to_owned(),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `[[tables]]`: a synced table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSection {
    pub name: String,
    /// Column kinds other than the default `lww`: `counter`, `max`, `min`.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Names of nodes whose writes win on `lww` columns.
    #[serde(default)]
    pub priority: Vec<String>,
}

/// `[listen]`: where peers connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    pub addr: String,
    /// Plaintext. Only allowed on loopback addresses (demos and tests).
    #[serde(default)]
    pub insecure: bool,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA that client certificates must chain to: enables mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Bearer tokens accepted from connecting peers (any one of them).
    #[serde(default)]
    pub tokens: Vec<String>,
}

/// `[[peers]]`: a node this node dials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub name: String,
    pub addr: String,
    #[serde(default)]
    pub insecure: bool,
    /// CA that the peer's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Our client certificate and key, for peers that require mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Bearer token to present.
    pub token: Option<String>,
}

/// `[admin]`: the HTTP listener for health, status and metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub addr: String,
}

/// `[sync]`: tuning. The defaults suit most deployments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    /// Most changes per batch sent to a peer.
    pub batch_changes_max: usize,
    /// Batches sent but not yet acknowledged, per peer (flow control).
    pub window_batches: usize,
    /// How often the store is checked for writes by other processes.
    pub poll_interval_ms: u64,
    /// First reconnect delay; doubles up to `reconnect_max_ms`, with full jitter.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Idle links send a heartbeat this often; a link silent for 4x this long is dropped.
    pub heartbeat_ms: u64,
    /// Log compaction interval.
    pub compact_interval_ms: u64,
    /// How often an idle link compares table digests with the peer (convergence check).
    pub check_interval_ms: u64,
    /// How often this node reconciles with the peers it dials (with ±10% jitter); 0 = never
    /// on a schedule (events and `driftless reconcile` still run it).
    pub reconcile_interval_ms: u64,
    /// How often this node checks its own tables against its merge state, reading every row,
    /// to find writes made behind driftless's back (with ±10% jitter); 0 = never on a schedule
    /// (`driftless diff --local` / `reconcile --local` still run it).
    pub local_check_interval_ms: u64,
    /// Log entries kept behind the head even when every peer has them.
    pub retain_entries_min: u64,
    /// The log never holds more entries than this; peers left behind are re-bootstrapped.
    pub retain_entries_max: u64,
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            batch_changes_max: 5_000,
            window_batches: 4,
            poll_interval_ms: 1,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            heartbeat_ms: 2_000,
            compact_interval_ms: 60_000,
            check_interval_ms: 30_000,
            reconcile_interval_ms: 3_600_000,
            local_check_interval_ms: 21_600_000,
            retain_entries_min: 10_000,
            retain_entries_max: 10_000_000,
        }
    }
}

/// A configuration problem, with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The node id of the node named `name`: the first 16 bytes of a BLAKE3 hash of the name.
/// Deterministic, so every node can refer to every other by name.
pub fn node_id_from_name(name: &str) -> NodeId {
    let hash = blake3::hash(format!("driftless node:{name}").as_bytes());
    let bytes: [u8; 16] = hash.as_bytes()[..16].try_into().expect("16 of 32 bytes");
    NodeId::from_bytes(bytes)
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A configuration checked and resolved: paths made absolute, names turned into ids.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    pub file: Config,
    /// Where the config was read from (relative paths in it are relative to its directory).
    pub path: PathBuf,
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub store: StoreLocation,
    pub tables: Vec<TableConfig>,
    pub max_clock_offset: Duration,
    pub listen_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<ResolvedConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` locates relative paths and names errors.
    pub fn parse(text: &str, path: &Path) -> Result<ResolvedConfig, ConfigError> {
        let file: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        file.resolve(path)
    }

    fn resolve(self, path: &Path) -> Result<ResolvedConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_owned(),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        let absolute = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        if !valid_node_name(&self.node.name) {
            return Err(invalid(
                "node.name",
                format!(
                    "{:?} is not a valid node name (1-64 letters, digits, '.', '_' or '-')",
                    self.node.name
                ),
            ));
        }
        let store = match self.store.kind.as_str() {
            "sqlite" => {
                if self.store.url.is_some()
                    || self.store.schema.is_some()
                    || self.store.driftless_schema.is_some()
                {
                    return Err(invalid(
                        "store",
                        "url, schema and driftless_schema are for kind = \"postgres\"".into(),
                    ));
                }
                match &self.store.path {
                    Some(p) => StoreLocation::Sqlite { path: absolute(p) },
                    None => {
                        return Err(invalid(
                            "store.path",
                            "required when kind = \"sqlite\"".into(),
                        ));
                    }
                }
            }
            "postgres" => {
                if self.store.path.is_some() {
                    return Err(invalid(
                        "store.path",
                        "is for kind = \"sqlite\"; use url".into(),
                    ));
                }
                match &self.store.url {
                    Some(url) if !url.trim().is_empty() => StoreLocation::Postgres {
                        url: url.clone(),
                        schema: self.store.schema.clone().unwrap_or_else(|| "public".into()),
                        driftless_schema: self
                            .store
                            .driftless_schema
                            .clone()
                            .unwrap_or_else(|| "driftless".into()),
                    },
                    _ => {
                        return Err(invalid(
                            "store.url",
                            "required when kind = \"postgres\"".into(),
                        ));
                    }
                }
            }
            other => {
                return Err(invalid(
                    "store.kind",
                    format!("unknown store kind {other:?}; expected \"sqlite\" or \"postgres\""),
                ));
            }
        };
        if self.tables.is_empty() {
            return Err(invalid(
                "tables",
                "no [[tables]] configured: list at least one table to sync".into(),
            ));
        }
        let mut tables = Vec::new();
        for (i, t) in self.tables.iter().enumerate() {
            let key = format!("tables[{i}]");
            let name = TableName::new(&t.name)
                .map_err(|e| invalid(&format!("{key}.name"), e.to_string()))?;
            if tables.iter().any(|c: &TableConfig| c.name == name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("table {name} is listed twice"),
                ));
            }
            let mut config = TableConfig::new(name);
            for (column, kind) in &t.columns {
                let column_name = ColumnName::new(column)
                    .map_err(|e| invalid(&format!("{key}.columns"), e.to_string()))?;
                let kind: ColumnKind =
                    kind.parse()
                        .map_err(|e: driftless_core::rules::UnknownColumnKind| {
                            invalid(&format!("{key}.columns.{column}"), e.to_string())
                        })?;
                config.column_kinds.push((column_name, kind));
            }
            for node in &t.priority {
                if !valid_node_name(node) {
                    return Err(invalid(
                        &format!("{key}.priority"),
                        format!("{node:?} is not a valid node name"),
                    ));
                }
                config.priority.push(node_id_from_name(node));
            }
            tables.push(config);
        }
        let listen_addr = match &self.listen {
            None => None,
            Some(listen) => {
                let addr: SocketAddr = listen.addr.parse().map_err(|e| {
                    invalid(
                        "listen.addr",
                        format!(
                            "{:?} is not an address like 127.0.0.1:7000: {e}",
                            listen.addr
                        ),
                    )
                })?;
                if listen.insecure {
                    if !addr.ip().is_loopback() {
                        return Err(invalid(
                            "listen.insecure",
                            format!(
                                "plaintext is only allowed on loopback addresses, not {addr}; configure cert and key"
                            ),
                        ));
                    }
                } else if listen.cert.is_none() || listen.key.is_none() {
                    return Err(invalid(
                        "listen",
                        "set cert and key (TLS), or insecure = true on a loopback address".into(),
                    ));
                }
                Some(addr)
            }
        };
        let mut peer_names = Vec::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let key = format!("peers[{i}]");
            if !valid_node_name(&peer.name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("{:?} is not a valid node name", peer.name),
                ));
            }
            if peer.name == self.node.name {
                return Err(invalid(
                    &format!("{key}.name"),
                    "a node cannot be its own peer".into(),
                ));
            }
            if peer_names.contains(&peer.name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("peer {} is listed twice", peer.name),
                ));
            }
            peer_names.push(peer.name.clone());
            if peer.addr.is_empty() {
                return Err(invalid(&format!("{key}.addr"), "required".into()));
            }
            if !peer.insecure && peer.ca.is_none() {
                return Err(invalid(
                    &key.to_string(),
                    "set ca (the CA that signs the peer's certificate), or insecure = true".into(),
                ));
            }
            if peer.cert.is_some() != peer.key.is_some() {
                return Err(invalid(&key.to_string(), "cert and key go together".into()));
            }
        }
        let admin_addr = match &self.admin {
            None => None,
            Some(admin) => Some(admin.addr.parse().map_err(|e| {
                invalid(
                    "admin.addr",
                    format!(
                        "{:?} is not an address like 127.0.0.1:9101: {e}",
                        admin.addr
                    ),
                )
            })?),
        };
        let s = &self.sync;
        for (key, value) in [
            ("sync.batch_changes_max", s.batch_changes_max as u64),
            ("sync.window_batches", s.window_batches as u64),
            ("sync.heartbeat_ms", s.heartbeat_ms),
            ("sync.reconnect_max_ms", s.reconnect_max_ms),
            ("sync.retain_entries_max", s.retain_entries_max),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if s.batch_changes_max > driftless_wire::BATCH_CHANGES_MAX {
            return Err(invalid(
                "sync.batch_changes_max",
                format!("the limit is {}", driftless_wire::BATCH_CHANGES_MAX),
            ));
        }
        let mut resolved = ResolvedConfig {
            node_id: node_id_from_name(&self.node.name),
            data_dir: absolute(&self.node.data_dir),
            store,
            tables,
            max_clock_offset: Duration::from_millis(self.node.max_clock_offset_ms),
            listen_addr,
            admin_addr,
            path: path.to_path_buf(),
            file: self,
        };
        // TLS file paths are relative to the config file too.
        if let Some(listen) = &mut resolved.file.listen {
            for p in [&mut listen.cert, &mut listen.key, &mut listen.client_ca]
                .into_iter()
                .flatten()
            {
                *p = absolute(p);
            }
        }
        for peer in &mut resolved.file.peers {
            for p in [&mut peer.ca, &mut peer.cert, &mut peer.key]
                .into_iter()
                .flatten()
            {
                *p = absolute(p);
            }
        }
        Ok(resolved)
    }
}

/// The commented example written by `driftless init`.
pub const EXAMPLE: &str = r#"# driftless node configuration. Every key is described in docs/config.md.
# Relative paths are relative to this file's directory.

[node]
name = "edge-1"                    # unique in the fleet; the node id is derived from it
data_dir = "./edge-1"              # driftless's own state
# max_clock_offset_ms = 60000      # remote changes stamped further ahead than this are held

[store]
kind = "sqlite"
path = "./edge-1/app.db"           # your database file; driftless adds _driftless_* tables to it
# kind = "postgres"                # or PostgreSQL (see docs/postgres.md for the grants):
# url = "postgres://driftless@localhost/app"
# schema = "public"                # where the synced tables are
# driftless_schema = "driftless"   # where driftless keeps its metadata

[[tables]]
name = "items"
columns = { stock = "counter" }    # per-column kinds: lww (default), counter, max, min
# priority = ["hub"]               # writes from these nodes win on lww columns

[listen]
addr = "127.0.0.1:7001"            # peers connect here
insecure = true                    # plaintext: loopback demos only. For TLS instead:
# cert = "tls/edge-1.pem"
# key = "tls/edge-1.key"
# client_ca = "tls/ca.pem"         # require client certificates signed by this CA (mutual TLS)
# tokens = ["change-me"]           # require one of these bearer tokens from connecting peers

[[peers]]
name = "hub"
addr = "127.0.0.1:7000"
insecure = true                    # or: ca = "tls/ca.pem", and cert/key for mutual TLS
# token = "change-me"

[admin]
addr = "127.0.0.1:9101"            # /healthz, /readyz, /status

# [sync]                           # tuning; defaults shown
# batch_changes_max = 5000
# window_batches = 4
# poll_interval_ms = 1
# reconnect_min_ms = 100
# reconnect_max_ms = 10000
# heartbeat_ms = 2000
# compact_interval_ms = 60000
# check_interval_ms = 30000
# reconcile_interval_ms = 3600000
# local_check_interval_ms = 21600000
# retain_entries_min = 10000
# retain_entries_max = 10000000
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ResolvedConfig, ConfigError> {
        Config::parse(text, Path::new("/etc/driftless/node.toml"))
    }

    #[test]
    fn the_example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.file.node.name, "edge-1");
        assert_eq!(
            c.store,
            StoreLocation::Sqlite {
                path: "/etc/driftless/./edge-1/app.db".into()
            }
        );
        assert_eq!(c.tables[0].column_kinds[0].1, ColumnKind::Counter);
        assert_eq!(c.node_id, node_id_from_name("edge-1"));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let text = EXAMPLE.replace(
            "insecure = true                    # plaintext",
            "insecur = true # typo",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `insecur`"), "{err}");
        let line = text
            .lines()
            .position(|l| l.starts_with("insecur "))
            .unwrap()
            + 1;
        assert!(err.contains(&format!("line {line}")), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                EXAMPLE.replace("\"counter\"", "\"sum\""),
                "tables[0].columns.stock",
            ),
            (
                EXAMPLE.replace("name = \"edge-1\"", "name = \"edge 1\""),
                "node.name",
            ),
            (
                EXAMPLE.replace("kind = \"sqlite\"", "kind = \"oracle\""),
                "store.kind",
            ),
            (
                EXAMPLE.replace("127.0.0.1:7001", "0.0.0.0:7001"),
                "listen.insecure",
            ),
            (
                EXAMPLE.replace("addr = \"127.0.0.1:9101\"", "addr = \"nine\""),
                "admin.addr",
            ),
            (
                EXAMPLE
                    .replace("# retain_entries_max = 10000000", "retain_entries_max = 0")
                    .replace("# [sync]", "[sync]"),
                "sync.retain_entries_max",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    #[test]
    fn postgres_stores_are_configured_by_url_and_passwords_never_shown() {
        let text = EXAMPLE.replace(
            "kind = \"sqlite\"\npath = \"./edge-1/app.db\"",
            "kind = \"postgres\"\nurl = \"postgres://app:s3cret@db.example/app\"",
        );
        let c = Config::parse(&text, Path::new("/etc/driftless/node.toml")).unwrap();
        assert_eq!(c.store.describe(), "postgres://app:***@db.example/app");
        assert_eq!(
            redact_password("host=x password=p dbname=y"),
            "host=x password=*** dbname=y"
        );
        let missing = EXAMPLE.replace(
            "kind = \"sqlite\"\npath = \"./edge-1/app.db\"",
            "kind = \"postgres\"",
        );
        let err = Config::parse(&missing, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.url"), "{err}");
    }
}
