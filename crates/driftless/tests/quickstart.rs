//! The README's first command, run as users run it: `driftless quickstart --once` must exit 0
//! (all replicas converged) and show equal digests for every replica.

use std::process::Command;

#[test]
fn quickstart_once_converges_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let qs = dir.path().join("qs");
    let out = Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["quickstart", "--once", "--dir"])
        .arg(&qs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all replicas converged"), "{stdout}");
    // the final digests of the three replicas are identical
    let result = stdout.split("[6/6] result").nth(1).unwrap();
    let digests: Vec<&str> = result
        .lines()
        .filter(|l| l.trim_start().starts_with("node-"))
        .map(|l| l.split_once(':').unwrap().1.trim())
        .collect();
    assert_eq!(digests.len(), 3, "{result}");
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{result}");
    assert!(result.contains("coffee stock 4"), "{result}");

    // Running it again in the same directory starts over cleanly; a foreign directory is refused.
    let again = Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["quickstart", "--once", "--dir"])
        .arg(&qs)
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let foreign = dir.path().join("mine");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "keep me").unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["quickstart", "--once", "--dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("was not made by the quickstart"));
    assert!(foreign.join("precious.txt").exists());
}

#[test]
fn config_errors_are_clear_and_init_writes_a_valid_example() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("driftless.toml");
    let init = Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["init", "-o"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(init.status.success());
    // refuses to overwrite
    let again = Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["init", "-o"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!again.status.success());
    // the example is a valid config: `status` on it reads the (new) store directly
    std::fs::create_dir_all(dir.path().join("edge-1")).unwrap();
    rusqlite::Connection::open(dir.path().join("edge-1/app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, stock INTEGER)")
        .unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["status", "--json", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["running"], false);
    assert_eq!(json["tables"][0]["table"], "items");
    // a typo is reported with its line
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("data_dir", "data_dri");
    std::fs::write(&config, text).unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        err.contains("unknown field `data_dri`") && err.contains("line 6"),
        "{err}"
    );
}
