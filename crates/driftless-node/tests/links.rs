//! Nodes run in-process (`run(config, listeners, shutdown)`) and linked over loopback: mesh and
//! hub-and-spoke topologies, TLS, mutual TLS, tokens, and refusals of bad peers and frames
//! without disturbing the good ones.

mod support;

use driftless_tls::TestPki;
use support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_mesh_converges_through_conflicting_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb, pc) = (
        Ports::bind().await,
        Ports::bind().await,
        Ports::bind().await,
    );
    let (addr_b, addr_c) = (pb.peer_addr(), pc.peer_addr());
    let a_cfg = config_text(
        "a",
        &insecure_listen(&pa),
        &(insecure_peer("b", addr_b) + &insecure_peer("c", addr_c)),
    );
    let b_cfg = config_text("b", &insecure_listen(&pb), &insecure_peer("c", addr_c));
    let c_cfg = config_text("c", &insecure_listen(&pc), "");
    let mut a = TestNode::start(dir.path(), "a", pa, a_cfg).await;
    let mut b = TestNode::start(dir.path(), "b", pb, b_cfg).await;
    let mut c = TestNode::start(dir.path(), "c", pc, c_cfg).await;

    a.sql("INSERT INTO items VALUES (1, 'tea', 2.0, 10), (2, 'coffee', 3.0, 10)");
    converge(&[&a, &b, &c]).await;
    // conflicting writes to one cell, concurrent edits to different columns, counter sales
    a.sql("UPDATE items SET price = 2.5 WHERE id = 1; UPDATE items SET stock = stock - 1 WHERE id = 2");
    b.sql("UPDATE items SET price = 2.75 WHERE id = 1; UPDATE items SET stock = stock - 2 WHERE id = 2");
    c.sql("UPDATE items SET name = 'green tea' WHERE id = 1; UPDATE items SET stock = stock - 3 WHERE id = 2");
    c.sql("INSERT INTO items VALUES (3, 'mate', 4.0, 5)");
    converge(&[&a, &b, &c]).await;
    for node in [&a, &b, &c] {
        assert_eq!(node.query_i64("SELECT stock FROM items WHERE id = 2"), 4);
        assert_eq!(
            node.query_i64("SELECT count(*) FROM items WHERE id = 1 AND name = 'green tea'"),
            1
        );
        assert_eq!(node.query_i64("SELECT count(*) FROM items"), 3);
    }
    let winner = a.query_i64("SELECT CAST(price * 100 AS INTEGER) FROM items WHERE id = 1");
    assert!(winner == 250 || winner == 275, "{winner}");
    let status = a.status().await;
    assert_eq!(
        status.peers.iter().filter(|p| p.connected).count(),
        2,
        "{status:?}"
    );
    for node in [&mut a, &mut b, &mut c] {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_relays_between_spokes_that_never_talk_directly() {
    let dir = tempfile::tempdir().unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let mut hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        config_text("hub", &insecure_listen_placeholder(hub_addr), ""),
    )
    .await;
    let mut spokes = Vec::new();
    for name in ["s1", "s2", "s3"] {
        let ports = Ports::bind().await;
        let cfg = config_text(name, "", &insecure_peer("hub", hub_addr));
        spokes.push(TestNode::start(dir.path(), name, ports, cfg).await);
    }
    spokes[0].sql("INSERT INTO items VALUES (1, 'from s1', 1.0, 1)");
    converge(&[&hub, &spokes[0], &spokes[1], &spokes[2]]).await;
    assert_eq!(
        spokes[2].query_i64("SELECT count(*) FROM items WHERE name = 'from s1'"),
        1
    );
    // concurrent writes everywhere, same cell and a counter
    for (i, spoke) in spokes.iter().enumerate() {
        spoke.sql(&format!(
            "UPDATE items SET name = 'by s{}', stock = stock + {} WHERE id = 1",
            i + 1,
            i + 1
        ));
        spoke.sql(&format!(
            "INSERT INTO items VALUES ({}, 'own', 0, 0)",
            10 + i
        ));
    }
    converge(&[&hub, &spokes[0], &spokes[1], &spokes[2]]).await;
    assert_eq!(
        hub.query_i64("SELECT stock FROM items WHERE id = 1"),
        1 + 1 + 2 + 3
    );
    assert_eq!(spokes[1].query_i64("SELECT count(*) FROM items"), 4);
    // multi-hop keeps origin and version: s3's stored state of s1's own row 10 names s1 as origin
    let origin = {
        let conn = rusqlite::Connection::open(&spokes[2].db).unwrap();
        let mut stmt = conn
            .prepare("SELECT id, node FROM _driftless_nodes")
            .unwrap();
        let stored: Vec<(u32, driftless_core::NodeId)> = stmt
            .query_map([], |r| {
                let bytes: Vec<u8> = r.get(1)?;
                Ok((
                    r.get(0)?,
                    driftless_core::NodeId::from_bytes(bytes.try_into().unwrap()),
                ))
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let nodes = driftless_store::rowmeta::NodeInterner::from_stored(stored).unwrap();
        let key = driftless_core::PrimaryKey::integer(10);
        let (seq, meta): (i64, Vec<u8>) = conn
            .query_row(
                "SELECT seq, meta FROM _driftless_rows WHERE pk = ?1",
                [key.as_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        driftless_store::rowmeta::RowMeta::decode(&meta, seq as u64, &nodes)
            .unwrap()
            .version
            .unwrap()
            .node
    };
    assert_eq!(
        origin,
        driftless_node::node_id_from_name("s1"),
        "relayed changes keep their origin"
    );
    for node in spokes.iter_mut().chain([&mut hub]) {
        node.stop().await.unwrap();
    }
}

fn insecure_listen_placeholder(addr: std::net::SocketAddr) -> String {
    format!("[listen]\naddr = \"{addr}\"\ninsecure = true")
}

fn tls_listen(ports: &Ports, pki: &TestPki, name: &str, mutual: bool) -> String {
    let (cert, key) = pki.issue(name).unwrap();
    let mut text = format!(
        "[listen]\naddr = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
        ports.peer_addr(),
        cert.display(),
        key.display()
    );
    if mutual {
        text.push_str(&format!("\nclient_ca = \"{}\"", pki.ca_path().display()));
    }
    text
}

fn tls_peer(
    name: &str,
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    client: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> String {
    let mut text = format!(
        "[[peers]]\nname = \"{name}\"\naddr = \"{addr}\"\nca = \"{}\"\n",
        ca.display()
    );
    if let Some((cert, key)) = client {
        text.push_str(&format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_links_work_and_bad_certificates_are_refused_without_disturbing_others() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki")).unwrap();
    let rogue = TestPki::new(&dir.path().join("rogue")).unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let listen = tls_listen(&hub_ports, &pki, "hub", true);
    let mut hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        config_text("hub", &listen, ""),
    )
    .await;
    let spoke = |name: &str,
                 ca: &std::path::Path,
                 client: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        config_text(name, "", &tls_peer("hub", hub_addr, ca, client))
    };
    let mut good = TestNode::start(
        dir.path(),
        "good",
        Ports::bind().await,
        spoke("good", &pki.ca_path(), Some(pki.issue("good").unwrap())),
    )
    .await;
    // a client certificate from another CA
    let mut forged = TestNode::start(
        dir.path(),
        "forged",
        Ports::bind().await,
        spoke(
            "forged",
            &pki.ca_path(),
            Some(rogue.issue("forged").unwrap()),
        ),
    )
    .await;
    // no client certificate at all
    let mut anonymous = TestNode::start(
        dir.path(),
        "anonymous",
        Ports::bind().await,
        spoke("anonymous", &pki.ca_path(), None),
    )
    .await;
    // trusts the wrong CA, so it refuses the hub
    let mut wary = TestNode::start(
        dir.path(),
        "wary",
        Ports::bind().await,
        spoke("wary", &rogue.ca_path(), Some(pki.issue("wary").unwrap())),
    )
    .await;
    // a valid certificate, but for another name than the hello claims
    let impostor_cfg = spoke("impostor", &pki.ca_path(), Some(pki.issue("good").unwrap()));
    let mut impostor =
        TestNode::start(dir.path(), "impostor", Ports::bind().await, impostor_cfg).await;

    good.sql("INSERT INTO items VALUES (1, 'over mTLS', 1.0, 1)");
    converge(&[&hub, &good]).await;
    eventually("the hub to count the refused links", async || {
        hub.status().await.auth_failures >= 4
    })
    .await;
    for refused in [&forged, &anonymous, &wary, &impostor] {
        let status = refused.status().await;
        let link = &status.peers[0];
        assert!(!link.connected, "{}: {link:?}", refused.name);
        assert!(link.last_error.is_some(), "{}: {link:?}", refused.name);
        assert_eq!(
            refused.query_i64("SELECT count(*) FROM items"),
            0,
            "{} got data",
            refused.name
        );
    }
    let wary_error = wary.status().await.peers[0].last_error.clone().unwrap();
    assert!(
        wary_error.contains("TLS handshake with hub failed"),
        "{wary_error}"
    );
    let impostor_error = impostor.status().await.peers[0].last_error.clone().unwrap();
    assert!(
        impostor_error.contains("certificate names \"good\""),
        "{impostor_error}"
    );
    // the good link is unaffected
    hub.sql("INSERT INTO items VALUES (2, 'still flowing', 1.0, 1)");
    converge(&[&hub, &good]).await;
    for node in [
        &mut good,
        &mut forged,
        &mut anonymous,
        &mut wary,
        &mut impostor,
        &mut hub,
    ] {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tls_without_client_certificates_works() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&dir.path().join("pki")).unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let listen = tls_listen(&hub_ports, &pki, "hub", false);
    let mut hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        config_text("hub", &listen, ""),
    )
    .await;
    let cfg = config_text("edge", "", &tls_peer("hub", hub_addr, &pki.ca_path(), None));
    let mut edge = TestNode::start(dir.path(), "edge", Ports::bind().await, cfg).await;
    edge.sql("INSERT INTO items VALUES (1, 'over TLS', 1.0, 1)");
    converge(&[&hub, &edge]).await;
    edge.stop().await.unwrap();
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_garbage_frames_are_refused_without_disturbing_others() {
    let dir = tempfile::tempdir().unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let listen = format!("{}\ntokens = [\"s3cret\"]", insecure_listen(&hub_ports));
    let mut hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        config_text("hub", &listen, ""),
    )
    .await;
    let with_token = |name: &str, token: &str| {
        config_text(
            name,
            "",
            &format!("{}token = \"{token}\"\n", insecure_peer("hub", hub_addr)),
        )
    };
    let mut good = TestNode::start(
        dir.path(),
        "good",
        Ports::bind().await,
        with_token("good", "s3cret"),
    )
    .await;
    let mut bad = TestNode::start(
        dir.path(),
        "bad",
        Ports::bind().await,
        with_token("bad", "guess"),
    )
    .await;

    // A peer that claims a 1 GiB frame, and one that sends garbage: both are cut off.
    let mut liar = tokio::net::TcpStream::connect(hub_addr).await.unwrap();
    liar.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    let mut garbage = tokio::net::TcpStream::connect(hub_addr).await.unwrap();
    garbage.write_all(&[0, 0, 0, 3, 99, 0, 0]).await.unwrap();
    eventually("two protocol errors", async || {
        hub.status().await.protocol_errors >= 2
    })
    .await;
    let mut byte = [0u8; 1];
    use tokio::io::AsyncReadExt;
    assert_eq!(
        liar.read(&mut byte).await.unwrap_or(0),
        0,
        "the hub closed the link"
    );

    good.sql("INSERT INTO items VALUES (1, 'with token', 1.0, 1)");
    converge(&[&hub, &good]).await;
    eventually("the wrong token to be refused", async || {
        hub.status().await.auth_failures >= 1
    })
    .await;
    let bad_status = bad.status().await;
    assert!(
        bad_status.peers[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("wrong token"),
        "{bad_status:?}"
    );
    assert_eq!(bad.query_i64("SELECT count(*) FROM items"), 0);
    for node in [&mut good, &mut bad, &mut hub] {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_offline_catches_up_from_its_cursor_however_much_changed() {
    let dir = tempfile::tempdir().unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    // a tiny retention, which storage format 2 no longer needs: the log is the rows' states, so
    // a returning peer always streams from its cursor, never from a snapshot
    let hub_cfg = config_text("hub", &insecure_listen(&hub_ports), "").replace(
        "[sync]\n",
        "[sync]\ncompact_interval_ms = 1000\nretain_entries_min = 0\nretain_entries_max = 50\n",
    );
    let mut hub = TestNode::start(dir.path(), "hub", hub_ports, hub_cfg).await;
    let edge_ports = Ports::bind().await;
    let edge_addr = edge_ports.peer_addr();
    let mut edge = TestNode::start(
        dir.path(),
        "edge",
        edge_ports,
        config_text("edge", "", &insecure_peer("hub", hub_addr)),
    )
    .await;
    hub.sql("INSERT INTO items VALUES (1, 'first', 1.0, 1)");
    converge(&[&hub, &edge]).await;

    edge.stop().await.unwrap();
    // while the edge is away: 500 rows, far beyond the retention setting
    let mut sql = String::from("BEGIN;");
    for i in 2..=501 {
        sql.push_str(&format!(
            "INSERT INTO items VALUES ({i}, 'while away', 1.0, 1);"
        ));
    }
    sql.push_str("COMMIT;");
    hub.sql(&sql);
    edge.sql("UPDATE items SET name = 'edited offline' WHERE id = 1");
    // let the hub run its compaction
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    edge.restart(edge_addr).await;
    converge(&[&hub, &edge]).await;
    assert_eq!(edge.query_i64("SELECT count(*) FROM items"), 501);
    let hub_status = hub.status().await;
    let link = hub_status.peers.iter().find(|p| p.name == "edge").unwrap();
    assert_eq!(link.snapshots_sent, 0, "{link:?}");
    assert_eq!(
        hub.query_i64("SELECT count(*) FROM _driftless_rows"),
        501,
        "the hub's log is one state per row"
    );
    assert_eq!(
        hub.query_i64("SELECT count(*) FROM items WHERE name = 'edited offline'"),
        1
    );
    edge.stop().await.unwrap();
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_coalescing_writes_is_captured_to_the_end() {
    // 15,000 updates of 100 rows in one transaction: the first capture round consumes 10,000
    // records but makes at most 100 changes; the poller must go on until the records run out,
    // even though nothing else is ever written.
    let dir = tempfile::tempdir().unwrap();
    let hub_ports = Ports::bind().await;
    let hub_addr = hub_ports.peer_addr();
    let listen = insecure_listen(&hub_ports);
    let mut hub = TestNode::start(
        dir.path(),
        "hub",
        hub_ports,
        config_text("hub", &listen, ""),
    )
    .await;
    let mut edge = TestNode::start(
        dir.path(),
        "edge",
        Ports::bind().await,
        config_text("edge", "", &insecure_peer("hub", hub_addr)),
    )
    .await;
    let mut sql = String::from("BEGIN;");
    for i in 0..100 {
        sql.push_str(&format!("INSERT INTO items VALUES ({i}, 'start', 0, 0);"));
    }
    for n in 1..=150 {
        for i in 0..100 {
            sql.push_str(&format!(
                "UPDATE items SET name = 'round {n}' WHERE id = {i};"
            ));
        }
    }
    // rows whose records come after the first round's 10,000
    for i in 100..200 {
        sql.push_str(&format!("INSERT INTO items VALUES ({i}, 'late', 0, 0);"));
    }
    sql.push_str("COMMIT;");
    edge.sql(&sql);
    converge(&[&hub, &edge]).await;
    assert_eq!(
        hub.query_i64("SELECT count(*) FROM items WHERE name = 'round 150'"),
        100
    );
    assert_eq!(
        hub.query_i64("SELECT count(*) FROM items WHERE name = 'late'"),
        100
    );
    edge.stop().await.unwrap();
    hub.stop().await.unwrap();
}
