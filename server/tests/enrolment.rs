//! FC_0–FC_2 over real TLS on 127.0.0.1: a backer-server, agents enrolling
//! with one-time tokens, the admin CLI with a certificate or the login, and
//! every refusal: used tokens, wrong CA, client certificates on admin calls,
//! revoked and superseded certificates, plain TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use backer_testkit::{Running, Server, agent, bin, err, ok, wait_for};
use serde_json::Value;

fn clients(server: &Server) -> Vec<Value> {
    serde_json::from_str::<Value>(&ok(server.cli(&["clients", "--json"])))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn state_of(list: &[Value], name: &str) -> (String, bool) {
    let c = list
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list:?}"));
    (
        c["state"].as_str().unwrap().to_string(),
        c["connected"].as_bool().unwrap(),
    )
}

fn enrol(server: &Server, tmp: &Path, name: &str, reenroll: bool) -> PathBuf {
    let bundle = tmp.join(format!("{name}-{}.json", if reenroll { "re" } else { "new" }));
    let verb = if reenroll { "reenroll" } else { "add" };
    ok(server.cli(&["clients", verb, name, "--bundle-out", bundle.to_str().unwrap()]));
    let state = tmp.join(format!("agent-{name}"));
    let out = ok(agent(&state, &["enroll", "--bundle", bundle.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(out.contains(&format!("enrolled as {name}")), "{out}");
    // The same token never works twice.
    let again = agent(
        &tmp.join("elsewhere"),
        &["enroll", "--bundle", bundle.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert!(
        err(&again).contains("token is unknown, used or expired"),
        "{}",
        err(&again)
    );
    state
}

#[test]
fn enrolment_identity_and_revocation() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "[web-1]\nIPAddress = \"127.0.0.1\"\n\n[web-2]\n");
    let admin = server.admin_cert();

    // FC_5 listing, FC_2: configured clients are listed before they enrol.
    let list = clients(&server);
    assert_eq!(state_of(&list, "web-1"), ("configured".into(), false));

    // FC_2: tokens, enrolment, agents connect.
    let s1 = enrol(&server, tmp, "web-1", false);
    let s2 = enrol(&server, tmp, "web-2", false);
    let key = std::fs::metadata(s1.join("key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    let mut a1 = Running(agent(&s1, &["run"]).stderr(Stdio::piped()).spawn().unwrap());
    let _a2 = Running(agent(&s2, &["run"]).stderr(Stdio::null()).spawn().unwrap());
    wait_for("both agents to connect", || {
        let l = clients(&server);
        state_of(&l, "web-1") == ("enrolled".into(), true)
            && state_of(&l, "web-2") == ("enrolled".into(), true)
    });

    // The REST port: probes and metrics over HTTPS, nothing secret.
    assert_eq!(server.http_get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(server.http_get("/readyz").0, 200);
    let (code, metrics) = server.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("backer_agents_connected 2"), "{metrics}");
    assert!(
        metrics.contains("backer_clients{state=\"enrolled\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("backer_certificate_expiry_timestamp_seconds{kind=\"server\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("web-1"), "metrics name no client");

    // FC_0: the login works, a wrong password does not, nothing does not.
    let with_login = |pw: &str| {
        Command::new(bin("backer"))
            .args(["--server", &server.mgmt, "--login", "admin", "clients"])
            .arg("--ca")
            .arg(admin.join("ca.pem"))
            .env("BACKER_SERVER_PASSWORD", pw)
            .output()
            .unwrap()
    };
    assert!(ok(with_login("s3cret")).contains("web-1"));
    assert!(err(&with_login("guess")).contains("wrong login or password"));
    let anonymous = Command::new(bin("backer"))
        .args(["--server", &server.mgmt, "clients"])
        .arg("--ca")
        .arg(admin.join("ca.pem"))
        .output()
        .unwrap();
    assert!(err(&anonymous).contains("no credentials"));

    // An agent's certificate is not an admin's.
    let as_agent = Command::new(bin("backer"))
        .args(["--server", &server.mgmt, "clients"])
        .arg("--ca")
        .arg(s1.join("ca.pem"))
        .arg("--cert")
        .arg(s1.join("cert.pem"))
        .arg("--key")
        .arg(s1.join("key.pem"))
        .output()
        .unwrap();
    assert!(
        err(&as_agent).contains("client web-1 may not call management methods"),
        "{}",
        err(&as_agent)
    );

    // FC_1: a server whose certificate our CA did not sign is refused.
    let other = tempfile::tempdir().unwrap();
    let other_admin = Server::start(other.path(), "").admin_cert();
    let wrong_ca = Command::new(bin("backer"))
        .args(["--server", &server.mgmt, "clients"])
        .arg("--ca")
        .arg(other_admin.join("ca.pem"))
        .arg("--cert")
        .arg(other_admin.join("admin.pem"))
        .arg("--key")
        .arg(other_admin.join("admin-key.pem"))
        .output()
        .unwrap();
    assert!(err(&wrong_ca).contains("failed to connect"), "{}", err(&wrong_ca));

    // Plain TCP on the data port is dropped; the server keeps serving.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(server.data.replace("localhost", "127.0.0.1")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(!buf[..n].starts_with(b"HTTP"), "plaintext got an HTTP answer");
    }
    assert_eq!(clients(&server).len(), 2);

    // Revocation is immediate: the connected agent is cut off and refused.
    ok(server.cli(&["clients", "remove", "web-1"]));
    let status = backer_testkit::wait_exit(&mut a1.0, "the revoked agent kept running");
    assert!(!status.success());
    let mut msg = String::new();
    std::io::Read::read_to_string(a1.0.stderr.as_mut().unwrap(), &mut msg).unwrap();
    assert!(msg.contains("client web-1 has been revoked"), "{msg}");
    assert_eq!(state_of(&clients(&server), "web-1"), ("revoked".into(), false));

    // Disaster recovery of a host: re-enrol under the same name; the old
    // certificate stops working, the new one works.
    let old = tmp.join("agent-web-2-old");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["agent.json", "ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(s2.join(f), old.join(f)).unwrap();
    }
    let s2new = enrol(&server, tmp, "web-2", true);
    let refused = agent(&old, &["run"]).output().unwrap();
    assert!(
        err(&refused).contains("was replaced or revoked"),
        "{}",
        err(&refused)
    );
    let _a2new = Running(agent(&s2new, &["run"]).stderr(Stdio::null()).spawn().unwrap());
    wait_for("the re-enrolled agent to connect", || {
        state_of(&clients(&server), "web-2") == ("enrolled".into(), true)
    });

    // Certificate status for the admin.
    let cs = ok(server.cli(&["cert", "status"]));
    assert!(
        cs.contains("CA certificate expires") && cs.contains("web-2"),
        "{cs}"
    );
}

#[test]
fn bad_configuration_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("server.toml");
    std::fs::write(
        &conf,
        "[server]\nMgmtPort = 1\n\n[repository]\nLocalization = \"/x\"\n\n[clients]\nConfigFile = \"c/\"\n",
    )
    .unwrap();
    let out = Command::new(bin("backer-server"))
        .arg("--config")
        .arg(&conf)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    let e = err(&out);
    assert!(e.contains("[server] ExternalName: is missing or empty"), "{e}");
}

/// Certificates out of their validity period are refused at the handshake,
/// even when the CA that signed them is the server's own.
#[test]
fn expired_and_not_yet_valid_certificates_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "");
    let admin = server.admin_cert();
    assert!(
        ok(server.cli(&["clients"])).contains("client"),
        "a valid certificate works"
    );
    let ca = backer_server::state::StateDir::new(&tmp.join("state"))
        .unwrap()
        .ca()
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    for (what, from, until) in [
        ("expired", now - day * 2, now - day),
        ("not yet valid", now + day, now + day * 2),
    ] {
        let issued = ca.issue_admin_between("ops", from, until).unwrap();
        let dir = tmp.join(what.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("admin.pem"), &issued.cert_pem).unwrap();
        std::fs::write(dir.join("admin-key.pem"), issued.key_pem.unwrap()).unwrap();
        let out = Command::new(bin("backer"))
            .args(["--server", &server.mgmt, "clients"])
            .arg("--ca")
            .arg(admin.join("ca.pem"))
            .arg("--cert")
            .arg(dir.join("admin.pem"))
            .arg("--key")
            .arg(dir.join("admin-key.pem"))
            .output()
            .unwrap();
        let e = err(&out);
        assert!(!e.contains("client"), "{what}: no listing: {e}");
        assert!(e.contains("error"), "{what}: {e}");
    }
}
