//! The pglogical setup of the PostgreSQL bench: the peer a user replicating between PostgreSQL
//! regions would pick instead (Debian `postgresql-15-pglogical`), the same workload in the same
//! run. Set up only when the extension is installed; otherwise the bench says how.
//!
//! It runs on a **private cluster** the bench starts for it (`initdb` in a temporary directory,
//! a free port, `shared_preload_libraries = pglogical`, `wal_level = logical`, otherwise the
//! defaults, which is what the shared server runs with too) and stops and deletes afterwards:
//! pglogical 2.4.2 preloaded on PostgreSQL 15 makes every `DROP DATABASE` on its server hang
//! (its supervisor never accepts the drop's signal barrier: 2ndQuadrant/pglogical#399, #418),
//! which must not happen to the shared server every test uses. While it runs, the bench's
//! helpers (WAL, checkpoints, CPU per backend) talk to that cluster.
//!
//! A provider database (`pglogical.create_node`, `items` in the `default` replication set) and a
//! subscriber database (`pglogical.create_subscription(..., synchronize_data := false)`).

use super::{
    ADMIN_URL_OVERRIDE, Groups, Options, PROBE_APP, Result, Server, Setup, compare, connect,
    database_url, logical_phases, replicate_marker,
};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The server binaries of the shared server's major version (`server_version`, e.g. `15.20
/// (Debian ...)`).
fn bin_dir(server_version: &str) -> PathBuf {
    let major = server_version.split('.').next().unwrap_or("15").trim();
    std::env::var_os("DRIFTLESS_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")))
}

/// Why pglogical cannot run here (`None`: it can), with how to make it run.
pub fn unavailable(server_version: &str) -> Result<Option<String>> {
    let bin = bin_dir(server_version);
    if !bin.join("initdb").exists() || !bin.join("pg_ctl").exists() {
        return Ok(Some(format!(
            "no initdb / pg_ctl in {} (set DRIFTLESS_PG_BIN) to start a private cluster for pglogical",
            bin.display()
        )));
    }
    let lib = Command::new(bin.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| bin.with_file_name("lib").display().to_string());
    if !Path::new(&lib).join("pglogical.so").exists() {
        return Ok(Some(format!(
            "the pglogical extension is not installed (no pglogical.so in {lib}): apt-get install \
             postgresql-{}-pglogical",
            server_version.split('.').next().unwrap_or("15").trim()
        )));
    }
    Ok(None)
}

/// Runs `program` as the `postgres` user when we are root (initdb refuses to run as root).
fn as_cluster_owner(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run_checked(mut command: Command, what: &str) -> Result<()> {
    let out = command.output()?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// A throwaway PostgreSQL cluster: stopped and deleted when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    root: bool,
    port: u16,
}

impl Cluster {
    fn start(bin: PathBuf, trusted_plugins: Option<String>) -> Result<Cluster> {
        let root = String::from_utf8(Command::new("id").arg("-u").output()?.stdout)?.trim() == "0";
        let dir = tempfile::Builder::new()
            .prefix("driftless-bench-pglogical-")
            .tempdir()?;
        if root {
            let uid: u32 =
                String::from_utf8(Command::new("id").args(["-u", "postgres"]).output()?.stdout)?
                    .trim()
                    .parse()?;
            let gid: u32 =
                String::from_utf8(Command::new("id").args(["-g", "postgres"]).output()?.stdout)?
                    .trim()
                    .parse()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let data = dir.path().join("data");
        let mut initdb = as_cluster_owner(&bin.join("initdb"), root);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_checked(initdb, "initdb")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cluster = Cluster {
            dir,
            bin,
            root,
            port,
        };
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pglogical \
             -c wal_level=logical -c max_wal_size=1GB",
            cluster.dir.path().display()
        );
        if let Some(list) = trusted_plugins {
            options.push_str(&format!(" -c output_plugin_libraries={list}"));
        }
        let mut pg_ctl = as_cluster_owner(&cluster.bin.join("pg_ctl"), root);
        pg_ctl
            .arg("-D")
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(cluster.dir.path().join("server.log"))
            .args(["-w", "start"]);
        run_checked(pg_ctl, "pg_ctl start")?;
        Ok(cluster)
    }

    fn admin_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut pg_ctl = as_cluster_owner(&self.bin.join("pg_ctl"), self.root);
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        if let Err(e) = run_checked(pg_ctl, "pg_ctl stop") {
            eprintln!("cleanup failed: {e}");
        }
    }
}

/// Points the bench's helpers at `url` until dropped.
struct Redirect;

impl Redirect {
    fn to(url: String) -> Redirect {
        *ADMIN_URL_OVERRIDE.lock().unwrap_or_else(|p| p.into_inner()) = Some(url);
        Redirect
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        *ADMIN_URL_OVERRIDE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

pub fn run(options: &Options, server_version: &str) -> Result<Setup> {
    // This server build only lets trusted output plugins decode (`output_plugin_libraries`);
    // pglogical's provider side is the `pglogical_output` plugin.
    let trusted = {
        let mut admin = connect(&super::admin_url(), PROBE_APP)?;
        admin
            .query_opt(
                "SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'",
                &[],
            )?
            .map(|r| {
                let list: String = r.get(0);
                let mut names: Vec<String> = list
                    .split(',')
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
                    .collect();
                names.push("pglogical_output".into());
                names.join(",")
            })
    };
    let cluster = Cluster::start(bin_dir(server_version), trusted)?;
    let redirect = Redirect::to(cluster.admin_url());
    let mut server = Server::new();
    let result = run_on(&mut server, options).map_err(|e| {
        // the cluster's log says why, and it goes with the cluster
        let log =
            std::fs::read_to_string(cluster.dir.path().join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{e}\nprivate cluster's log (last lines):\n{}",
            tail.join("\n")
        )
        .into()
    });
    // (nothing is dropped on the private cluster: a DROP DATABASE would hang there; the
    // cluster goes as a whole)
    server.databases.clear();
    drop(server);
    drop(redirect);
    drop(cluster);
    result
}

fn run_on(server: &mut Server, options: &Options) -> Result<Setup> {
    let provider = server.create_database("plpub")?;
    let subscriber = server.create_database("plsub")?;
    let provider_db = server.database_name("plpub");
    let provider_dsn = database_url(&provider_db);
    let subscriber_dsn = database_url(&server.database_name("plsub"));
    let mut p = connect(&provider, PROBE_APP)?;
    p.batch_execute("CREATE EXTENSION pglogical")?;
    p.execute(
        "SELECT pglogical.create_node(node_name := 'provider', dsn := $1)",
        &[&provider_dsn],
    )?;
    p.batch_execute("SELECT pglogical.replication_set_add_table('default', 'public.items')")?;
    let mut s = connect(&subscriber, PROBE_APP)?;
    s.batch_execute("CREATE EXTENSION pglogical")?;
    s.execute(
        "SELECT pglogical.create_node(node_name := 'subscriber', dsn := $1)",
        &[&subscriber_dsn],
    )?;
    s.execute(
        "SELECT pglogical.create_subscription(subscription_name := 'bench_sub', \
         provider_dsn := $1, synchronize_structure := false, synchronize_data := false)",
        &[&provider_dsn],
    )?;
    let started = Instant::now();
    loop {
        let status: Option<String> = s
            .query_opt(
                "SELECT status FROM pglogical.show_subscription_status('bench_sub')",
                &[],
            )?
            .map(|r| r.get(0));
        if status.as_deref() == Some("replicating") {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "pglogical subscription not replicating after 60 s (status {status:?})"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let marker = replicate_marker(&provider, &subscriber)?;
    eprintln!(
        "pglogical: subscription replicating (marker row replicated in {:.0} ms)",
        marker.as_secs_f64() * 1e3
    );
    let groups = Groups {
        main: std::process::id(),
        origin_workers: HashSet::new(),
        destination_workers: HashSet::new(),
        origin_poller: HashSet::new(),
        origin_db: provider_db.clone(),
        destination_db: server.database_name("plsub"),
    };
    let slot_lsn_sql = format!(
        "SELECT coalesce(max((confirmed_flush_lsn - '0/0'::pg_lsn)::int8), 0) FROM \
         pg_replication_slots WHERE database = '{provider_db}'"
    );
    let (inserts, updates_phase, sizes) = logical_phases(
        "pglogical",
        options,
        &groups,
        ("provider", &provider),
        ("pglogical subscriber", &subscriber),
        &slot_lsn_sql,
    )?;
    eprintln!("pglogical updates done; comparing");
    Ok(Setup {
        inserts,
        updates: updates_phase,
        update_changes: None,
        details: vec![
            compare(&provider, &subscriber)?,
            sizes,
            "pglogical 2.4 on a private cluster (same defaults as the shared server), default \
             replication set, synchronize_data := false, default conflict resolution"
                .to_owned(),
        ],
    })
}
