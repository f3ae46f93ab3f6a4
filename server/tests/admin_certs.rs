//! Admin certificates over real TLS on 127.0.0.1: the server accepts only
//! those `backer-server admin-cert` recorded, a revoked one is refused at its
//! next call (even on a connection already open), whether it was revoked by
//! another admin through the server or on the server host while the server
//! runs, and the operator's own short-lived certificate needs no record only
//! where the operator's PKI is in use.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backer_proto::ca::Ca;
use backer_proto::v1 as pb;
use backer_testkit::{Server, ServerSetup, bin, err, json, ok};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// `backer-server --state-dir STATE ARGS` on the server host.
fn server_host(server: &Server, args: &[&str]) -> Output {
    Command::new(bin("backer-server"))
        .arg("--state-dir")
        .arg(server.dir.join("state"))
        .args(args)
        .output()
        .unwrap()
}

/// Issues an admin certificate for `name` into `DIR/NAME`.
fn issue(server: &Server, name: &str) -> PathBuf {
    let out = server.dir.join(name);
    let said = ok(server_host(
        server,
        &["admin-cert", "--name", name, "--out", out.to_str().unwrap()],
    ));
    assert!(said.contains("serial"), "{said}");
    out
}

/// `backer ARGS` as the admin whose certificate is in `dir`.
fn backer_as(server: &Server, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("backer"))
        .args(["--server", &server.mgmt])
        .arg("--ca")
        .arg(server.dir.join("admin/ca.pem"))
        .arg("--cert")
        .arg(dir.join("admin.pem"))
        .arg("--key")
        .arg(dir.join("admin-key.pem"))
        .args(args)
        .output()
        .unwrap()
}

/// A management client on one connection, with an admin certificate.
async fn mgmt(
    address: &str,
    ca_pem: &str,
    cert: &str,
    key: &str,
) -> pb::management_client::ManagementClient<tonic::transport::Channel> {
    let channel = backer_proto::connect(address, ca_pem, Some((cert, key)))
        .await
        .unwrap();
    pb::management_client::ManagementClient::new(channel)
}

async fn list(
    m: &mut pb::management_client::ManagementClient<tonic::transport::Channel>,
) -> Result<(), String> {
    m.list_clients(pb::ListClientsRequest {})
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[test]
fn admin_certificates_are_recorded_and_revoked_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), "");
    let ops = server.admin_cert();
    // Issued while the server runs: it sees the record without a restart.
    let alice = issue(&server, "alice");
    let carol = issue(&server, "carol");
    for dir in [&ops, &alice, &carol] {
        assert!(ok(backer_as(&server, dir, &["clients"])).contains("client"));
    }
    let listed = json(ok(server.cli(&["cert", "admins", "--json"])));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ops", "alice", "carol"], "{listed}");
    assert!(listed[1]["revoked"].is_null(), "{listed}");

    let ca_pem = read(&ops.join("ca.pem"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Alice's connection is open and working when ops revokes her.
        let mut as_alice = mgmt(
            &server.mgmt,
            &ca_pem,
            &read(&alice.join("admin.pem")),
            &read(&alice.join("admin-key.pem")),
        )
        .await;
        list(&mut as_alice).await.expect("alice's certificate works");
        let out = ok(server.cli(&["cert", "revoke-admin", "alice"]));
        assert!(out.contains("revoked 1 admin certificate(s) of alice"), "{out}");
        let refused = list(&mut as_alice)
            .await
            .expect_err("a revoked certificate is refused at its next call");
        assert!(
            refused.contains("PermissionDenied")
                && refused.contains("admin certificate of alice was revoked"),
            "{refused}"
        );
    });
    let e = err(&backer_as(&server, &alice, &["clients"]));
    assert!(e.contains("was revoked"), "{e}");
    assert!(
        ok(backer_as(&server, &carol, &["clients"])).contains("client"),
        "another admin still works"
    );
    let listed = json(ok(server.cli(&["cert", "admins", "--json"])));
    assert!(listed[1]["revoked"].as_i64().unwrap() > 0, "{listed}");
    let e = err(&server.cli(&["cert", "revoke-admin", "nobody"]));
    assert!(e.contains("no admin certificate of nobody is recorded"), "{e}");

    // On the server host, while the server runs (and for one that is down).
    let out = ok(server_host(&server, &["admin-cert", "--revoke", "ops"]));
    assert!(out.contains("revoked 1 admin certificate(s) of ops"), "{out}");
    let e = err(&server.cli(&["clients"]));
    assert!(e.contains("admin certificate of ops was revoked"), "{e}");
    assert!(ok(backer_as(&server, &carol, &["clients"])).contains("client"));
    let offline = ok(server_host(&server, &["admin-cert", "--list"]));
    let revoked_rows = offline
        .lines()
        .filter(|l| (l.starts_with("ops ") || l.starts_with("alice ")) && !l.ends_with(" -"))
        .count();
    assert_eq!(revoked_rows, 2, "{offline}");

    // A certificate the CA signed but `admin-cert` never recorded (as one
    // issued before the record existed): refused, saying what to do.
    let ca = backer_server::state::StateDir::new(&server.dir.join("state"))
        .unwrap()
        .ca()
        .unwrap();
    let stray = ca.issue_admin("dave", 90).unwrap();
    let dir = server.dir.join("stray");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin.pem"), &stray.cert_pem).unwrap();
    std::fs::write(dir.join("admin-key.pem"), stray.key_pem.unwrap()).unwrap();
    let e = err(&backer_as(&server, &dir, &["clients"]));
    assert!(
        e.contains("not in the server's record of admin certificates")
            && e.contains("backer-server admin-cert --name dave"),
        "{e}"
    );

    // The operator's name is not for `admin-cert`.
    let e = err(&server_host(
        &server,
        &["admin-cert", "--name", "backer-operator", "--out", "/nonexistent"],
    ));
    assert!(e.contains("the operator's own identity"), "{e}");
    backer_testkit::figures(
        "admin certificates",
        "revoked through the server and on its host, each refused at its next call; an unrecorded one refused",
    );
}

/// With the operator's PKI (`--pki-dir`), the operator's own certificate
/// (named backer-operator, two days long, minted in its memory) is accepted
/// without a record; a longer one, another name, or a server with its own
/// CA are not.
#[test]
fn only_the_operators_short_certificate_needs_no_record() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = Ca::create("operator").unwrap();
    let server_cert = ca.issue_server(&["localhost".into()]).unwrap();
    std::fs::write(pki.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(pki.join("ca-key.pem"), ca.key_pem()).unwrap();
    std::fs::write(pki.join("server.pem"), &server_cert.cert_pem).unwrap();
    std::fs::write(pki.join("server-key.pem"), server_cert.key_pem.unwrap()).unwrap();
    let server = Server::start_with(
        &tmp.path().join("server"),
        ServerSetup {
            args: vec!["--pki-dir".into(), pki.display().to_string()],
            ..Default::default()
        },
    );
    let standalone = Server::start(&tmp.path().join("standalone"), "");
    let own_ca = backer_server::state::StateDir::new(&standalone.dir.join("state"))
        .unwrap()
        .ca()
        .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let try_with = |server: &Server, ca: &Ca, name: &str, days: i64| {
            let issued = ca.issue_admin(name, days).unwrap();
            let address = server.mgmt.clone();
            let ca_pem = ca.cert_pem.clone();
            async move {
                let key = issued.key_pem.unwrap();
                list(&mut mgmt(&address, &ca_pem, &issued.cert_pem, &key).await).await
            }
        };
        try_with(&server, &ca, "backer-operator", 2)
            .await
            .expect("the operator's certificate works");
        for (what, result) in [
            (
                "a longer-lived certificate under the operator's name",
                try_with(&server, &ca, "backer-operator", 30).await,
            ),
            (
                "a short-lived certificate under another name",
                try_with(&server, &ca, "ops", 2).await,
            ),
            (
                "the operator's name on a server with its own CA",
                try_with(&standalone, &own_ca, "backer-operator", 2).await,
            ),
        ] {
            let e = result.expect_err(what);
            assert!(e.contains("not in the server's record"), "{what}: {e}");
        }
    });
    // The REST port serves the operator's server certificate.
    assert_eq!(server.http_get("/readyz").0, 200);
}
