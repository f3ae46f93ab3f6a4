//! Identity on the data port: every wrong certificate is refused, a client
//! revoked in the middle of a backup is cut off without a snapshot, and a
//! certificate renewed during a long backup lets that backup finish.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use backer_proto::ca::Ca;
use backer_proto::v1 as pb;
use backer_testkit::{Running, Server, agent, json, ok, pseudo_random, wait_for};
use serde_json::Value;

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

/// Calls the agent service with `identity`; the refusal, if any, as text.
async fn try_as(address: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> Result<(), String> {
    let channel = backer_proto::connect(address, ca_pem, identity)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    pb::agent_client::AgentClient::new(channel)
        .chunk_keys(pb::ChunkKeysRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[test]
fn wrong_certificates_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "");
    let admin = server.admin_cert();
    let (host, other) = (tmp.join("host"), tmp.join("other"));
    server.enrol("host", &host);
    server.enrol("other", &other);
    let ca_pem = read(&host, "ca.pem");
    let (cert, key) = (read(&host, "cert.pem"), read(&host, "key.pem"));
    let (admin_cert, admin_key) = (read(&admin, "admin.pem"), read(&admin, "admin-key.pem"));
    let state_dir = backer_server::state::StateDir::new(&tmp.join("state")).unwrap();
    let server_cert = read(&tmp.join("state"), "server.pem");
    let server_key = read(&tmp.join("state"), "server-key.pem");
    // A certificate for "host" from a CA that is not the server's.
    let evil_ca = Ca::create("evil").unwrap();
    let (evil_key, csr) = backer_proto::pki::new_csr().unwrap();
    let evil_cert = evil_ca.sign_client("host", &csr).unwrap().cert_pem;
    // And one from the right CA that the registry never recorded (as if
    // minted with a stolen CA key backup but not through enrolment).
    let (stray_key, csr) = backer_proto::pki::new_csr().unwrap();
    let stray_cert = state_dir
        .ca()
        .unwrap()
        .sign_client("host", &csr)
        .unwrap()
        .cert_pem;
    let port = server.data.rsplit(':').next().unwrap().to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let data = server.data.as_str();
        try_as(data, &ca_pem, Some((&cert, &key)))
            .await
            .expect("the right certificate works");
        let other_key = read(&other, "key.pem");
        // (what, address, identity, what the refusal says)
        type Case<'a> = (&'a str, String, Option<(&'a str, &'a str)>, &'a str);
        let cases: Vec<Case> = vec![
            ("no client certificate", data.into(), None, ""),
            (
                "a certificate from another CA",
                data.into(),
                Some((&evil_cert, &evil_key)),
                "",
            ),
            (
                "host's certificate with another host's key",
                data.into(),
                Some((&cert, &other_key)),
                "",
            ),
            (
                "an admin certificate",
                data.into(),
                Some((&admin_cert, &admin_key)),
                "admin certificate",
            ),
            (
                "the server's own certificate",
                data.into(),
                Some((&server_cert, &server_key)),
                "",
            ),
            (
                "a certificate the server never issued to the client",
                data.into(),
                Some((&stray_cert, &stray_key)),
                "replaced or revoked",
            ),
            (
                "a server reached under a name its certificate lacks",
                format!("127.0.0.2:{port}"),
                Some((&cert, &key)),
                "",
            ),
        ];
        let n = cases.len();
        for (what, address, identity, says) in cases {
            let e = try_as(&address, &ca_pem, identity)
                .await
                .expect_err(&format!("{what} must be refused"));
            assert!(e.contains(says), "{what}: {e}");
        }
        backer_testkit::figures(
            "identity",
            format!("{n} wrong-certificate cases refused on the data port"),
        );
    });
    // The server is still serving.
    assert!(ok(server.cli(&["clients"])).contains("host"));
}

fn slow_agent(state: &Path, log: &Path) -> Running {
    Running(
        agent(state, &["run", "--limit-upload", "4096"])
            .env("BACKER_LOG", "info")
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .unwrap(),
    )
}

fn job(server: &Server, id: &str) -> Value {
    json(ok(server.cli(&["jobs", "--json"])))
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap()
}

/// Starts a backup of `src` and returns its id once it is moving data.
fn start_backup(server: &Server, src: &Path) -> String {
    let id = json(ok(server.cli(&[
        "backup",
        "host",
        src.to_str().unwrap(),
        "--json",
    ])))["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the backup to move data", || {
        job(server, &id)["bytes_done"].as_u64().unwrap_or(0) > 0
    });
    id
}

fn wait_done(server: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = job(server, id);
        if j["state"] != "running" && j["state"] != "queued" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {j}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn renewal_during_a_long_backup_and_revocation_in_the_middle_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "");
    server.admin_cert();
    let state = tmp.join("agent");
    server.enrol("host", &state);
    let log = tmp.join("agent.log");
    let mut agent_proc = slow_agent(&state, &log);
    server.wait_connected("host");
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..3 {
        std::fs::write(src.join(format!("f{i}")), pseudo_random(8 << 20, i)).unwrap();
    }

    // Renewed while a backup uploads at 4 MiB/s: the backup finishes on the
    // old certificate, and the agent reconnects with the new one.
    let id = start_backup(&server, &src);
    let old_cert = read(&state, "cert.pem");
    let out = ok(agent(&state, &["renew"]).output().unwrap());
    assert!(out.contains("renewed"), "{out}");
    assert_ne!(read(&state, "cert.pem"), old_cert);
    assert_eq!(
        job(&server, &id)["state"],
        "running",
        "the renewal came mid-backup"
    );
    let j = wait_done(&server, &id);
    assert_eq!(j["state"], "succeeded", "{j}");
    wait_for("the agent to reconnect with its new certificate", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("reconnecting with a new certificate")
    });
    server.wait_connected("host");
    std::fs::write(src.join("f0"), pseudo_random(8 << 20, 99)).unwrap();
    let out = ok(server.cli(&["backup", "host", src.to_str().unwrap(), "--wait"]));
    assert!(out.contains("succeeded"), "the new certificate works: {out}");

    // Revoked in the middle of a backup: cut off, the job fails, no snapshot.
    let snapshots = |server: &Server| {
        json(ok(server.cli(&["snapshots", "host", "--json"])))
            .as_array()
            .unwrap()
            .len()
    };
    let before = snapshots(&server);
    for i in 0..3 {
        std::fs::write(src.join(format!("f{i}")), pseudo_random(8 << 20, 200 + i)).unwrap();
    }
    let id = start_backup(&server, &src);
    ok(server.cli(&["clients", "remove", "host"]));
    let j = wait_done(&server, &id);
    assert_eq!(j["state"], "failed", "{j}");
    let status = backer_testkit::wait_exit(&mut agent_proc.0, "the revoked agent kept running");
    assert!(!status.success());
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("has been revoked")
    );
    assert_eq!(
        snapshots(&server),
        before,
        "no snapshot from the revoked client's last backup"
    );
    agent_proc = slow_agent(&state, &tmp.join("agent2.log"));
    let status = backer_testkit::wait_exit(&mut agent_proc.0, "a revoked agent came back");
    assert!(!status.success(), "a revoked agent cannot come back");
    backer_testkit::figures(
        "identity",
        "a renewal mid-backup let it finish; a revocation mid-backup failed it without a snapshot",
    );
}
