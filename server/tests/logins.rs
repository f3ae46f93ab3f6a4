//! The server's Login/Password over real TLS on 127.0.0.1: the REST port is
//! HTTPS with the server's certificate (its JSON views take the login, which
//! must never cross the network in clear), and wrong passwords are throttled
//! per peer on both the REST views and the management port, logged with the
//! peer and the login, never the password.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use backer_testkit::{Server, ServerSetup, bin, err, ok};

const WRONG: &str = "hunter2-wrong";
const OTHER_PEER: Option<Ipv4Addr> = Some(Ipv4Addr::new(127, 0, 0, 2));

#[test]
fn the_rest_port_is_tls_and_wrong_passwords_are_throttled() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let log = tmp.join("server.log");
    let server = Server::start_with(
        tmp,
        ServerSetup {
            log: Some(log.clone()),
            ..Default::default()
        },
    );

    // HTTPS with the server's certificate, which the testkit checks against
    // the server's CA: probes, metrics and the views work.
    assert_eq!(server.http_get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(server.http_get("/readyz").0, 200);
    let (code, body) = server.http_get_auth("/api/v1/jobs", "admin", "s3cret");
    assert_eq!((code, body.as_str()), (200, "[]"));
    // Plain HTTP gets no HTTP answer: the credentials never travel in clear.
    {
        let mut s = std::net::TcpStream::connect(&server.rest).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let basic = "YWRtaW46czNjcmV0"; // admin:s3cret
        let _ = write!(
            s,
            "GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n"
        );
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
            "plain HTTP was answered: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }

    // A burst of wrong passwords: the first few are refused as wrong, the
    // rest refused unchecked for a growing window.
    let started = Instant::now();
    let codes: Vec<u16> = (0..30)
        .map(|_| server.http_get_auth("/api/v1/jobs", "mallory", WRONG).0)
        .collect();
    let throttled = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(&codes[..6], &[401; 6], "{codes:?}");
    assert!(throttled >= 20, "a burst must be refused: {codes:?}");
    // Still inside the window (1 s, then 2 s…): even the right password is
    // refused from this peer, so a guesser learns nothing…
    if started.elapsed() < Duration::from_millis(900) {
        let (code, body) = server.http_get_auth("/api/v1/jobs", "admin", "s3cret");
        assert_eq!(code, 429, "{body}");
        assert!(body.contains("too many failed logins"), "{body}");
    }
    // …while another peer is not held up by it.
    let (code, body) = server.http_get_auth_from(OTHER_PEER, "/api/v1/jobs", "admin", "s3cret");
    assert_eq!(code, 200, "another peer: {body}");
    // After the window the right password works, and starts the peer afresh.
    let (code, body) = wait_until_not_throttled(|| server.http_get_auth("/api/v1/jobs", "admin", "s3cret"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        server.http_get_auth("/api/v1/jobs", "mallory", WRONG).0,
        401,
        "a good login resets the count"
    );

    // The management port shares the check and the throttle.
    let admin = server.admin_cert();
    let with_login = |pw: &str| -> Output {
        Command::new(bin("backer"))
            .args(["--server", &server.mgmt, "--login", "admin", "clients"])
            .arg("--ca")
            .arg(admin.join("ca.pem"))
            .env("BACKER_SERVER_PASSWORD", pw)
            .output()
            .unwrap()
    };
    let refusals: Vec<String> = (0..12).map(|_| err(&with_login(WRONG))).collect();
    assert!(refusals[0].contains("wrong login or password"), "{}", refusals[0]);
    let held = refusals
        .iter()
        .filter(|e| e.contains("too many failed logins"))
        .count();
    assert!(held >= 3, "{refusals:#?}");
    // An admin certificate is not a password: it is not held up.
    assert!(ok(server.cli(&["clients"])).contains("client"));
    let listing = wait_until_ok(|| with_login("s3cret"));
    assert!(listing.contains("client"), "{listing}");

    // Each failure is logged with the peer and the login given; no password,
    // right or wrong, in any form.
    let logged = plain_log(&log);
    let failures = logged
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("failed login"))
        .collect::<Vec<_>>();
    assert!(
        failures
            .iter()
            .any(|l| l.contains("127.0.0.1") && l.contains("\"mallory\"") && l.contains("rest")),
        "{logged}"
    );
    assert!(
        failures
            .iter()
            .any(|l| l.contains("127.0.0.1") && l.contains("\"admin\"") && l.contains("management")),
        "{logged}"
    );
    assert!(logged.contains("too many failed logins"), "{logged}");
    use base64::Engine;
    for secret in [
        WRONG.to_string(),
        "s3cret".to_string(),
        base64::engine::general_purpose::STANDARD.encode(format!("mallory:{WRONG}")),
        base64::engine::general_purpose::STANDARD.encode("admin:s3cret"),
    ] {
        assert!(!logged.contains(&secret), "{secret} was logged:\n{logged}");
    }
    backer_testkit::figures(
        "logins",
        format!(
            "{throttled} of 30 wrong REST logins refused unchecked; {} failed logins logged",
            failures.len()
        ),
    );
}

/// Retries `f` while it answers 429, for at most the first windows (1 + 2 s…).
fn wait_until_not_throttled(mut f: impl FnMut() -> (u16, String)) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = f();
        if r.0 != 429 || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Retries a command while the server refuses it as throttled.
fn wait_until_ok(mut f: impl FnMut() -> Output) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = f();
        let throttled = String::from_utf8_lossy(&o.stderr).contains("too many failed logins");
        if !throttled || Instant::now() > deadline {
            return ok(o);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `--insecure-plaintext`: the REST port is plain HTTP too, and the log says
/// so, naming the REST port and its login.
#[test]
fn plaintext_rest_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let log = tmp.join("server.log");
    let server = Server::start_with(
        tmp,
        ServerSetup {
            args: vec!["--insecure-plaintext".into()],
            log: Some(log.clone()),
            ..Default::default()
        },
    );
    assert!(server.rest_ca.is_none());
    assert_eq!(server.http_get("/healthz").0, 200);
    assert_eq!(server.http_get_auth("/api/v1/jobs", "admin", "s3cret").0, 200);
    let logged = plain_log(&log);
    assert!(
        logged.contains("INSECURE") && logged.contains("the REST port"),
        "{logged}"
    );
    assert!(logged.contains("tls=false"), "{logged}");
}

/// The server's log without its terminal colours.
fn plain_log(path: &std::path::Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence runs to its final letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
