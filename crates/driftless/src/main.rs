//! The `driftless` binary: parses the command line and hands off to the library crates.
//! It holds no logic of its own.

mod progress;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use driftless_node::{Config, Listeners, ops};
use driftless_store::LISTING_ROWS_MAX;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "driftless",
    version,
    about = "Keeps the same tables in several data stores in agreement."
)]
struct Cli {
    /// Log format of `run` and `quickstart`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Three SQLite replicas on this machine, synced, through conflicts and a partition.
    Quickstart {
        /// Where to create the replicas and their configs.
        #[arg(long, default_value = "./driftless-quickstart")]
        dir: PathBuf,
        /// Run the demo and exit: 0 if all replicas converged, 1 otherwise.
        #[arg(long)]
        once: bool,
    },
    /// Run one node.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Write a commented example config.
    Init {
        /// Where to write it.
        #[arg(short, long, default_value = "driftless.toml")]
        output: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Per peer: connected, lag, backlog, last error; per table: rows, conflicts, dead letters.
    Status {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Refresh in place every second until Ctrl-C.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Compare this node's tables with a peer's (exit 0 = in agreement, 1 = differences).
    Diff {
        #[arg(short, long)]
        config: PathBuf,
        /// The peer to compare with (the node must be running and linked to it).
        #[arg(long)]
        peer: String,
        #[arg(long)]
        table: Option<String>,
        /// Also read every row of both replicas against their merge states, to find writes made
        /// behind driftless's back (a full scan on each side; otherwise done on a schedule).
        #[arg(long)]
        local: bool,
        #[arg(long)]
        json: bool,
    },
    /// Find and repair differences with a peer, through the merge rule (exit 0 when done).
    Reconcile {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        peer: String,
        #[arg(long)]
        table: Option<String>,
        /// Also read every row of both replicas against their merge states and restore rows
        /// written behind driftless's back (a full scan on each side).
        #[arg(long)]
        local: bool,
        #[arg(long)]
        json: bool,
    },
    /// Changes that could not be applied.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// The conflict ledger.
    Conflicts {
        #[command(subcommand)]
        action: ConflictsAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters with their reasons.
    List {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Retry dead letters (all, or the given ids) after fixing their cause.
    Retry {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Dead letter ids; none = all.
        ids: Vec<i64>,
    },
    /// Discard dead letters for good (all, or the given ids).
    Drop {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Dead letter ids; none = all.
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum ConflictsAction {
    /// List resolved conflicts, newest first.
    List {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Flushes exported traces when dropped (feature `otlp`).
struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Logs go to stderr; `DRIFTLESS_LOG` (e.g. `debug`, `driftless_node=trace`) overrides the level.
/// With the `otlp` feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are also exported.
fn init_logs(format: LogFormat, default_level: &str) -> TelemetryGuard {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        EnvFilter::try_from_env("DRIFTLESS_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let colors = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colors)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    #[cfg(feature = "otlp")]
    {
        use opentelemetry::trace::TracerProvider as _;
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
            {
                Ok(exporter) => {
                    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .build();
                    let otel =
                        tracing_opentelemetry::layer().with_tracer(provider.tracer("driftless"));
                    tracing_subscriber::registry()
                        .with(fmt.with_filter(filter))
                        .with(otel)
                        .init();
                    return TelemetryGuard {
                        provider: Some(provider),
                    };
                }
                Err(e) => eprintln!("driftless: OTLP export disabled: {e}"),
            }
        }
    }
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .init();
    TelemetryGuard {
        #[cfg(feature = "otlp")]
        provider: None,
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn terminated() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

async fn main_inner(cli: Cli) -> anyhow::Result<ExitCode> {
    let repair = matches!(cli.command, Command::Reconcile { .. });
    match cli.command {
        Command::Quickstart { dir, once } => {
            // the quickstart tells its own story; logs show only warnings unless asked
            let _telemetry = init_logs(cli.log_format, "warn");
            let report = driftless_node::quickstart::quickstart(&dir, once, terminated()).await?;
            Ok(if report.converged {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run { config } => {
            let _telemetry = init_logs(cli.log_format, "info");
            let config = Config::load(&config)?;
            let listeners = Listeners::bind(&config).await?;
            driftless_node::run(config, listeners, terminated()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { output, force } => {
            if output.exists() && !force {
                bail!("{} exists; pass --force to overwrite it", output.display());
            }
            std::fs::write(&output, driftless_node::config::EXAMPLE)
                .with_context(|| format!("cannot write {}", output.display()))?;
            println!(
                "wrote {}: edit it, then `driftless run -c {}`",
                output.display(),
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            config,
            json,
            watch,
        } => {
            let config = Config::load(&config)?;
            if watch {
                let addr = config
                    .admin_addr
                    .context("--watch needs the node's [admin] addr in the config")?;
                let refresh = async {
                    loop {
                        let text = match ops::fetch_status(addr).await {
                            Ok(status) => ops::render_status(&status, true),
                            Err(e) => format!("admin API at {addr} unreachable: {e}\n"),
                        };
                        // clear the screen and draw from the top
                        print!("\x1b[2J\x1b[H{text}\n(refreshing every second; Ctrl-C to stop)\n");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                };
                tokio::select! {
                    _ = refresh => {}
                    _ = terminated() => {}
                }
                return Ok(ExitCode::SUCCESS);
            }
            let (status, running) = match config.admin_addr {
                Some(addr) => match ops::fetch_status(addr).await {
                    Ok(status) => (status, true),
                    Err(e) => {
                        eprintln!(
                            "admin API at {addr} unreachable ({e}); reading the store directly"
                        );
                        (offline_status(&config).await?, false)
                    }
                },
                None => (offline_status(&config).await?, false),
            };
            if json {
                let mut value = serde_json::to_value(&status)?;
                value["running"] = running.into();
                print_json(&value);
            } else {
                print!("{}", ops::render_status(&status, running));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff {
            config,
            peer,
            table,
            local,
            json,
        }
        | Command::Reconcile {
            config,
            peer,
            table,
            local,
            json,
        } => {
            let config = Config::load(&config)?;
            let addr = config.admin_addr.context(
                "the node's [admin] addr is needed: diff and reconcile run in the running node",
            )?;
            let options = driftless_node::reconcile::ReconcileOptions {
                repair,
                local_check: local,
            };
            let request = ops::request_reconcile_with(addr, &peer, table.as_deref(), options);
            tokio::pin!(request);
            // progress on a terminal only: scripts and --json get the report alone
            let bar = (!json && std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .then(progress::ReconcileBar::new);
            let report = loop {
                tokio::select! {
                    result = &mut request => break result,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                        if let Some(bar) = &bar
                            && let Ok(progress) = ops::fetch_reconcile_progress(addr).await
                        {
                            bar.show(progress.as_ref());
                        }
                    }
                }
            };
            if let Some(bar) = bar {
                bar.finish();
            }
            let report = report.map_err(anyhow::Error::msg)?;
            if json {
                print_json(&serde_json::to_value(&report)?);
            } else {
                print!("{}", ops::render_reconcile(&report));
            }
            Ok(if !repair && report.found_differences() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Dlq { action } => {
            let (config, json) = match &action {
                DlqAction::List { config, json, .. }
                | DlqAction::Retry { config, json, .. }
                | DlqAction::Drop { config, json, .. } => (config.clone(), *json),
            };
            let config = Config::load(&config)?;
            blocking(move || {
            let mut store = driftless_node::open_store(&config)?;
            match action {
                DlqAction::List { limit, .. } => {
                    let letters = store.dead_letters(limit.min(LISTING_ROWS_MAX))?;
                    if json {
                        print_json(&ops::dead_letters_json(&letters));
                    } else {
                        print!("{}", ops::render_dead_letters(&letters));
                    }
                }
                DlqAction::Retry { ids, .. } => {
                    let report = store.retry_dead_letters(ops::ids(&ids).as_deref())?;
                    if json {
                        print_json(
                            &serde_json::json!({"applied": report.applied, "still_dead": report.dead_lettered, "held": report.held}),
                        );
                    } else {
                        println!(
                            "retried: {} applied, {} still dead, {} held",
                            report.applied, report.dead_lettered, report.held
                        );
                    }
                }
                DlqAction::Drop { ids, .. } => {
                    let dropped = store.drop_dead_letters(ops::ids(&ids).as_deref())?;
                    if json {
                        print_json(&serde_json::json!({"dropped": dropped}));
                    } else {
                        println!("dropped {dropped} dead letters");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
            })
            .await
        }
        Command::Conflicts {
            action:
                ConflictsAction::List {
                    config,
                    json,
                    limit,
                },
        } => {
            let config = Config::load(&config)?;
            blocking(move || {
                let mut store = driftless_node::open_store(&config)?;
                let conflicts = store.conflicts(limit.min(LISTING_ROWS_MAX))?;
                if json {
                    print_json(&ops::conflicts_json(&conflicts));
                } else {
                    print!("{}", ops::render_conflicts(&conflicts));
                }
                Ok(ExitCode::SUCCESS)
            })
            .await
        }
    }
}

/// Runs store work off the async threads (the PostgreSQL client blocks on a runtime of its own).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

async fn offline_status(
    config: &driftless_node::ResolvedConfig,
) -> anyhow::Result<driftless_node::NodeStatus> {
    let config = config.clone();
    blocking(move || Ok(ops::offline_status(&config)?)).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("driftless: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("driftless: {e:#}");
            ExitCode::from(2)
        }
    }
}
