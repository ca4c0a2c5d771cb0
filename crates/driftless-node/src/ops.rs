//! Operator commands behind `driftless status`, `dlq` and `conflicts`: fetch or compute the
//! data, and render it as text or JSON. The binary only parses arguments and prints.

use crate::config::ResolvedConfig;
use crate::node::{NodeError, open_store};
use crate::status::{NodeStatus, TableStatus};
use driftless_store::{DeadLetter, DeadLetterId, StoredConflict};
use serde_json::json;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest status document accepted from the admin API.
const STATUS_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Asks a running node for its status over the admin API.
pub async fn fetch_status(admin: SocketAddr) -> Result<NodeStatus, String> {
    let body = admin_request(admin, "GET", "/status", Duration::from_secs(5)).await?;
    serde_json::from_str(&body).map_err(|e| format!("bad status document: {e}"))
}

/// The node's Prometheus exposition (`GET /metrics`).
pub async fn fetch_metrics(admin: SocketAddr) -> Result<String, String> {
    admin_request(admin, "GET", "/metrics", Duration::from_secs(5)).await
}

/// Runs `driftless diff` (`repair = false`) or `driftless reconcile` on a running node, without
/// the local check (see [`request_reconcile_with`]).
pub async fn request_reconcile(
    admin: SocketAddr,
    peer: &str,
    table: Option<&str>,
    repair: bool,
) -> Result<crate::reconcile::ReconcileReport, String> {
    let options = crate::reconcile::ReconcileOptions {
        repair,
        local_check: false,
    };
    request_reconcile_with(admin, peer, table, options).await
}

/// Runs a reconciliation on a running node with all options.
pub async fn request_reconcile_with(
    admin: SocketAddr,
    peer: &str,
    table: Option<&str>,
    options: crate::reconcile::ReconcileOptions,
) -> Result<crate::reconcile::ReconcileReport, String> {
    let mut path = format!(
        "/reconcile?peer={}&repair={}&local={}",
        url_escape(peer),
        options.repair,
        options.local_check
    );
    if let Some(table) = table {
        path.push_str(&format!("&table={}", url_escape(table)));
    }
    let body = admin_request(admin, "POST", &path, Duration::from_secs(3600)).await?;
    serde_json::from_str(&body).map_err(|e| format!("bad reconciliation report: {e}"))
}

/// What the node's running reconciliation is doing, if one runs.
pub async fn fetch_reconcile_progress(
    admin: SocketAddr,
) -> Result<Option<crate::reconcile::ReconcileProgress>, String> {
    let body = admin_request(admin, "GET", "/reconcile/progress", Duration::from_secs(5)).await?;
    serde_json::from_str(&body).map_err(|e| format!("bad progress document: {e}"))
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// One HTTP/1.1 request to the admin API; returns the body of a 200 answer.
async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| e.to_string())?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        (&mut stream)
            .take(STATUS_BYTES_MAX as u64)
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<Vec<u8>, String>(response)
    };
    let response = tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| format!("the admin API did not answer within {timeout:?}"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or("error");
        return Err(format!("{status}: {}", body.trim()));
    }
    Ok(body.to_owned())
}

/// `driftless diff` / `driftless reconcile` as text.
pub fn render_reconcile(report: &crate::reconcile::ReconcileReport) -> String {
    let mut out = String::new();
    let rows: Vec<Vec<String>> = report
        .tables
        .iter()
        .map(|t| {
            vec![
                t.table.clone(),
                format!(
                    "{}/{}",
                    t.ranges_compared - t.ranges_differing,
                    t.ranges_compared
                ),
                t.keys_only_here.to_string(),
                t.keys_only_there.to_string(),
                t.keys_differing.to_string(),
                if report.local_check {
                    format!(
                        "{} here, {} there",
                        t.local_restored + t.local_adopted,
                        t.peer_restored + t.peer_adopted
                    )
                } else {
                    "not checked".into()
                },
                if report.repair {
                    format!("{} here, {} there", t.repaired_here, t.repaired_there)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "TABLE",
            "RANGES AGREEING",
            "ONLY HERE",
            "ONLY THERE",
            "DIFFERING",
            "LOCAL DRIFT",
            "REPAIRED",
        ],
        &rows,
    );
    for t in &report.tables {
        if !t.sample_keys.is_empty() {
            let _ = writeln!(out, "{}: sample keys {}", t.table, t.sample_keys.join(", "));
        }
    }
    let _ = writeln!(
        out,
        "{} with {}: {} round trips, {} bytes sent, {} bytes received, {} ms",
        if report.repair {
            "reconciled"
        } else {
            "compared"
        },
        report.peer,
        report.round_trips,
        report.bytes_sent,
        report.bytes_received,
        report.millis
    );
    if report.local_check {
        let rows: u64 = report
            .tables
            .iter()
            .map(|t| t.local_checked_rows + t.peer_checked_rows)
            .sum();
        let _ = writeln!(
            out,
            "local check: {rows} rows read on both sides in {} ms",
            report.local_check_millis
        );
    } else {
        let _ = writeln!(
            out,
            "(writes made behind driftless's back are found by the scheduled local check, or now with --local)"
        );
    }
    let verdict = match (report.found_differences(), report.repair) {
        (false, _) => "in agreement",
        (true, false) => "differences found",
        (true, true) => "differences found and repaired",
    };
    let _ = writeln!(out, "{verdict}");
    out
}

/// Status read straight from the store, for when the node is not running.
pub fn offline_status(config: &ResolvedConfig) -> Result<NodeStatus, NodeError> {
    let mut store = open_store(config)?;
    Ok(NodeStatus {
        name: config.file.node.name.clone(),
        node_id: config.node_id.to_string(),
        store: config.store.describe(),
        log_head: store.log_head()?.0,
        pending_local_writes: store.pending_local_writes()?,
        held_changes: 0,
        auth_failures: 0,
        protocol_errors: 0,
        changes_captured: 0,
        changes_applied: 0,
        peers: Vec::new(),
        tables: store
            .table_stats()?
            .into_iter()
            .map(|t| TableStatus {
                table: t.table.to_string(),
                rows: t.rows,
                conflicts: t.conflicts,
                dead_letters: t.dead_letters,
            })
            .collect(),
    })
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let _ = writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    );
    for row in rows {
        let _ = writeln!(out, "{}", line(row.clone()));
    }
}

/// `driftless status` as text.
pub fn render_status(status: &NodeStatus, running: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} ({}){}\nstore {}\nlog head {}, local writes waiting {}, held changes {}\n",
        status.name,
        status.node_id,
        if running {
            ""
        } else {
            " — not running (figures read from the store)"
        },
        status.store,
        status.log_head,
        status.pending_local_writes,
        status.held_changes
    );
    if running {
        let rows: Vec<Vec<String>> = status
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.direction.clone(),
                    if p.connected {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                    p.lag_ms_last.map_or("-".into(), |ms| format!("{ms} ms")),
                    p.backlog_out.to_string(),
                    p.backlog_in.to_string(),
                    p.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "PEER",
                "DIRECTION",
                "CONNECTED",
                "LAG",
                "BACKLOG OUT",
                "BACKLOG IN",
                "LAST ERROR",
            ],
            &rows,
        );
        out.push('\n');
    }
    let rows: Vec<Vec<String>> = status
        .tables
        .iter()
        .map(|t| {
            vec![
                t.table.clone(),
                t.rows.to_string(),
                t.conflicts.to_string(),
                t.dead_letters.to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["TABLE", "ROWS", "CONFLICTS", "DEAD LETTERS"],
        &rows,
    );
    out
}

pub fn dead_letters_json(letters: &[DeadLetter]) -> serde_json::Value {
    json!(
        letters
            .iter()
            .map(|d| json!({
                "id": d.id.0,
                "table": d.table,
                "key": d.key.as_ref().map(|k| k.to_string()),
                "version": d.version.map(|v| v.to_string()),
                "from": d.from.map(|f| f.to_string()),
                "reason": d.reason,
                "attempts": d.attempts,
                "at_ms": d.at_ms,
            }))
            .collect::<Vec<_>>()
    )
}

pub fn render_dead_letters(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".into();
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.table.clone(),
                d.key.as_ref().map_or("-".into(), |k| k.to_string()),
                d.attempts.to_string(),
                d.reason.clone(),
            ]
        })
        .collect();
    let mut out = String::new();
    table(
        &mut out,
        &["ID", "TABLE", "KEY", "ATTEMPTS", "REASON"],
        &rows,
    );
    out
}

pub fn conflicts_json(conflicts: &[StoredConflict]) -> serde_json::Value {
    json!(conflicts
        .iter()
        .map(|c| {
            let r = &c.record;
            json!({
                "id": c.id,
                "table": r.table.to_string(),
                "key": r.key.to_string(),
                "column": r.column.to_string(),
                "rule": r.rule.as_str(),
                "winner": {"version": r.winner.version.to_string(), "value": r.winner.value.as_ref().map(|v| v.to_string())},
                "loser": {"version": r.loser.version.to_string(), "value": r.loser.value.as_ref().map(|v| v.to_string())},
                "at_ms": c.at_ms,
            })
        })
        .collect::<Vec<_>>())
}

pub fn render_conflicts(conflicts: &[StoredConflict]) -> String {
    if conflicts.is_empty() {
        return "no conflicts\n".into();
    }
    let show = |v: &Option<driftless_core::Value>| {
        v.as_ref().map_or("(deleted)".into(), |v| v.to_string())
    };
    let rows: Vec<Vec<String>> = conflicts
        .iter()
        .map(|c| {
            let r = &c.record;
            vec![
                c.id.to_string(),
                r.table.to_string(),
                r.key.to_string(),
                r.column.to_string(),
                r.rule.as_str().to_owned(),
                show(&r.winner.value),
                show(&r.loser.value),
            ]
        })
        .collect();
    let mut out = String::new();
    table(
        &mut out,
        &["ID", "TABLE", "KEY", "COLUMN", "RULE", "WINNER", "LOSER"],
        &rows,
    );
    out
}

/// Parses dead-letter ids given on the command line (none = all).
pub fn ids(ids: &[i64]) -> Option<Vec<DeadLetterId>> {
    (!ids.is_empty()).then(|| ids.iter().map(|i| DeadLetterId(*i)).collect())
}
