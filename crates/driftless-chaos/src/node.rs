//! One `driftless run` process: its config file, replica (a SQLite file or a PostgreSQL
//! database), stderr log and clock-skew file, and
//! the signals the harness sends it (SIGKILL, SIGSTOP/SIGCONT, SIGTERM). Dropping a node kills
//! its process, so a failing history leaves no stray processes.
//!
//! Signals other than SIGKILL go through the `kill` command: the workspace forbids `unsafe`.

use crate::plan::MAX_CLOCK_OFFSET_MS;
use crate::schema::TABLES_TOML;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The sync tuning of chaos nodes: small batches (many frames to fault), quick heartbeats and
/// reconnects, and compaction effectively off so the checker finds every local change in the
/// origin's log.
const SYNC_TOML: &str = "[sync]\nbatch_changes_max = 50\nwindow_batches = 4\nheartbeat_ms = 500\n\
reconnect_min_ms = 50\nreconnect_max_ms = 500\ncompact_interval_ms = 86400000\n";

/// Where a node's replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database of its own: `url` is its libpq connection string.
    Postgres { url: String, database: String },
}

impl StoreSpec {
    pub fn is_postgres(&self) -> bool {
        matches!(self, StoreSpec::Postgres { .. })
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            StoreSpec::Sqlite(path) => Some(path),
            StoreSpec::Postgres { .. } => None,
        }
    }

    /// For messages: the file, or `postgres:<database>`.
    pub fn describe(&self) -> String {
        match self {
            StoreSpec::Sqlite(path) => path.display().to_string(),
            StoreSpec::Postgres { database, .. } => format!("postgres:{database}"),
        }
    }

    /// The `[store]` section of the node's config.
    fn toml(&self) -> String {
        match self {
            StoreSpec::Sqlite(path) => {
                format!(
                    "[store]\nkind = \"sqlite\"\npath = \"{}\"\n",
                    toml_escape(&path.display().to_string())
                )
            }
            StoreSpec::Postgres { url, .. } => {
                format!(
                    "[store]\nkind = \"postgres\"\nurl = \"{}\"\n",
                    toml_escape(url)
                )
            }
        }
    }
}

/// A TOML basic string's content (a connection string may hold quotes or backslashes).
fn toml_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// What a node's config needs besides its name.
#[derive(Debug, Clone)]
pub struct NodeLayout {
    pub name: String,
    pub store: StoreSpec,
    /// The node's own peer listener, if some link dials it.
    pub listen: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// `(peer name, proxy address)` for every link this node dials.
    pub peers: Vec<(String, SocketAddr)>,
}

/// The node's TOML config.
pub fn config_text(layout: &NodeLayout) -> String {
    let name = &layout.name;
    let mut text = format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"./{name}-data\"\nmax_clock_offset_ms = {MAX_CLOCK_OFFSET_MS}\n\n\
         {}\n{TABLES_TOML}\n",
        layout.store.toml()
    );
    if let Some(addr) = layout.listen {
        let _ = write!(text, "[listen]\naddr = \"{addr}\"\ninsecure = true\n\n");
    }
    let _ = write!(text, "[admin]\naddr = \"{}\"\n\n{SYNC_TOML}", layout.admin);
    for (peer, addr) in &layout.peers {
        let _ = write!(
            text,
            "\n[[peers]]\nname = \"{peer}\"\naddr = \"{addr}\"\ninsecure = true\n"
        );
    }
    text
}

/// One node process (or the place for one, while it is down).
#[derive(Debug)]
pub struct NodeProcess {
    pub name: String,
    pub config: PathBuf,
    pub store: StoreSpec,
    pub log: PathBuf,
    pub skew_file: PathBuf,
    pub admin: SocketAddr,
    bin: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub paused: bool,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl NodeProcess {
    /// Writes the config and an empty skew file in `dir`; starts nothing.
    pub fn new(
        layout: &NodeLayout,
        dir: &Path,
        bin: &Path,
        env: &[(String, String)],
    ) -> io::Result<NodeProcess> {
        let config = dir.join(format!("{}.toml", layout.name));
        std::fs::write(&config, config_text(layout))?;
        let skew_file = dir.join(format!("{}.skew", layout.name));
        std::fs::write(&skew_file, "0")?;
        Ok(NodeProcess {
            name: layout.name.clone(),
            config,
            store: layout.store.clone(),
            log: dir.join(format!("{}.stderr.log", layout.name)),
            skew_file,
            admin: layout.admin,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            env: env.to_vec(),
            child: None,
            paused: false,
        })
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process (stderr appended to its log) without waiting for it to be ready.
    pub fn spawn(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(&self.bin);
        command
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .current_dir(&self.dir)
            .env("DRIFTLESS_LOG", "info")
            .env("DRIFTLESS_CLOCK_SKEW_FILE", &self.skew_file)
            // the test build keeps every change it made or applied, for the checker (inspect.rs)
            .env("DRIFTLESS_HISTORY", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (key, value) in &self.env {
            command.env(key, value);
        }
        self.child = Some(command.spawn()?);
        self.paused = false;
        Ok(())
    }

    /// Waits until the node answers on its admin port.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("{} exited during startup with {status}", self.name));
            }
            if TcpStream::connect_timeout(&self.admin, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "{} did not open its admin port within {timeout:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// If the process has exited, reaps it and returns its status.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.paused = false;
        Some(status)
    }

    /// SIGKILL (works on a paused process too), then reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    fn signal(&self, signal: &str) -> io::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill -{signal} {pid}: {status}")))
        }
    }

    /// SIGSTOP.
    pub fn pause(&mut self) -> io::Result<()> {
        self.signal("STOP")?;
        self.paused = self.child.is_some();
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> io::Result<()> {
        if self.paused {
            self.signal("CONT")?;
            self.paused = false;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `grace`; kills it if it is still running. Returns the exit
    /// status, or `None` if it had to be killed (or was not running).
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.resume().ok()?;
        self.signal("TERM").ok()?;
        let started = Instant::now();
        while started.elapsed() < grace {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Sets the node's wall-clock skew (read by the node every 100 ms). Written to a temporary
    /// file and renamed, so the node never reads half a number.
    pub fn set_skew(&self, ms: i64) -> io::Result<()> {
        let tmp = self.skew_file.with_extension("skew.tmp");
        std::fs::write(&tmp, ms.to_string())?;
        std::fs::rename(&tmp, &self.skew_file)
    }

    /// The last `bytes` of the node's stderr.
    pub fn log_tail(&self, bytes: usize) -> String {
        match std::fs::read(&self.log) {
            Ok(all) => {
                let start = all.len().saturating_sub(bytes);
                String::from_utf8_lossy(&all[start..]).into_owned()
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }

    /// The node's whole stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftless_node::config::{Config, StoreLocation};

    fn layout(store: StoreSpec) -> NodeLayout {
        NodeLayout {
            name: "n1".into(),
            store,
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 20_001))),
            admin: SocketAddr::from(([127, 0, 0, 1], 20_002)),
            peers: vec![("n0".into(), SocketAddr::from(([127, 0, 0, 1], 20_003)))],
        }
    }

    /// The node must accept the config the harness writes, and see the store it was meant to.
    #[test]
    fn configs_of_both_store_kinds_are_accepted_by_the_node() {
        let url = "host=127.0.0.1 port=5432 user=postgres dbname=chaos_1_2_n1 password='a\"b\\c'";
        let pg = config_text(&layout(StoreSpec::Postgres {
            url: url.into(),
            database: "chaos_1_2_n1".into(),
        }));
        let resolved = Config::parse(&pg, Path::new("/tmp/n1.toml")).expect("postgres config");
        match resolved.store {
            StoreLocation::Postgres { url: parsed, .. } => assert_eq!(parsed, url),
            other => panic!("expected a PostgreSQL store, got {other:?}"),
        }
        let sqlite = config_text(&layout(StoreSpec::Sqlite("/tmp/n1.db".into())));
        let resolved = Config::parse(&sqlite, Path::new("/tmp/n1.toml")).expect("sqlite config");
        assert!(
            matches!(&resolved.store, StoreLocation::Sqlite { path } if path == Path::new("/tmp/n1.db")),
            "{:?}",
            resolved.store
        );
        assert_eq!(resolved.tables.len(), 2);
    }
}
