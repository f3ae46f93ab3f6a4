//! What the admin sees when a job fails or the server goes away, and how
//! soon an agent comes back after a restart, with real processes on
//! 127.0.0.1: `backer … --wait` prints the job's reason and exits non-zero;
//! a server restart while it waits reads as a lost connection, not an h2
//! error; an agent reconnects within seconds even after several restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backer_testkit::{Running, Server, ServerSetup, agent, json, ok, pseudo_random, wait_for};

fn run_agent(state: &Path, args: &[&str], log: &Path) -> Running {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    Running(
        agent(state, &all)
            .env("BACKER_LOG", "info")
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .unwrap(),
    )
}

/// The error line `backer` ended with.
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
}

#[test]
fn wait_prints_why_a_job_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "");
    server.admin_cert();
    let state = tmp.join("agent");
    server.enrol("host", &state);
    let allowed = tmp.join("restores");
    let _agent = run_agent(
        &state,
        &["--restore-root", allowed.to_str().unwrap()],
        &tmp.join("agent.log"),
    );
    server.wait_connected("host");

    // A path the client does not have.
    let missing = tmp.join("no-such-dir");
    let out = server.cli(&["backup", "host", missing.to_str().unwrap(), "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = error_line(&stderr);
    assert!(
        line.contains(" failed: ") && line.contains("failed to read") && line.contains("no-such-dir"),
        "the reason is in the error: {stderr}"
    );

    // A restore the agent refuses (outside its --restore-root).
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    assert!(ok(server.cli(&["backup", "host", src.to_str().unwrap(), "--wait"])).contains("succeeded"));
    let out = server.cli(&[
        "restore",
        "latest",
        "--client",
        "host",
        "--target",
        tmp.join("elsewhere").to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        error_line(&stderr).contains("refused to restore into"),
        "{stderr}"
    );
    // The same reason as the job's record.
    let jobs = json(ok(server.cli(&["jobs", "--json"])));
    let last = jobs.as_array().unwrap().last().unwrap();
    let reason = last["messages"][0].as_str().unwrap();
    assert!(error_line(&stderr).ends_with(reason), "{stderr} / {last}");
}

/// Waits for `child` and returns its stderr.
fn stderr_of(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_restart_reads_as_a_lost_connection_and_agents_come_back_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let setup = ServerSetup::default();
    let mut server = Server::start_with(tmp, setup.clone());
    let admin = server.admin_cert();
    let state = tmp.join("agent");
    server.enrol("host", &state);
    let log = tmp.join("agent.log");
    let _agent = run_agent(&state, &["--limit-upload", "1024"], &log);
    server.wait_connected("host");

    // A backup slow enough (1 MiB/s) to be under way when the server restarts.
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big"), pseudo_random(16 << 20, 7)).unwrap();
    let mut waiting = Some(
        Command::new(backer_testkit::bin("backer"))
            .args(["--server", &server.mgmt])
            .arg("--ca")
            .arg(admin.join("ca.pem"))
            .arg("--cert")
            .arg(admin.join("admin.pem"))
            .arg("--key")
            .arg(admin.join("admin-key.pem"))
            .args(["backup", "host", src.to_str().unwrap(), "--wait"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for("the backup to move data", || {
        json(ok(server.cli(&["jobs", "--json"])))
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "running" && j["bytes_done"].as_u64().unwrap_or(0) > 0)
    });
    let mgmt = server.mgmt.clone();
    let mut reconnect = Vec::new();
    for _ in 1..=3 {
        server = Server::restart(server, &setup);
        let restarted = Instant::now();
        server.wait_connected("host");
        reconnect.push(restarted.elapsed());
        if let Some(child) = waiting.take() {
            let (code, stderr) = stderr_of(child);
            assert_eq!(code, Some(1), "{stderr}");
            let line = error_line(&stderr);
            assert!(
                line.contains(&format!("lost the connection to the server at {mgmt}"))
                    && line.contains("`backer jobs` shows how the job ended"),
                "{stderr}"
            );
            assert!(!stderr.contains("h2 protocol error"), "{stderr}");
            // And it did: failed by the restart, with the reason.
            let jobs = json(ok(server.cli(&["jobs", "--json"])));
            let job = &jobs.as_array().unwrap()[0];
            assert_eq!(job["state"], "failed", "{job}");
        }
    }
    // The agent had a working connection each time: it starts its reconnect
    // wait afresh rather than doubling it restart after restart. Shown by
    // its log, not by timing it (a loaded machine makes any bound a guess):
    // each restart ended a connection the server had accepted, so each time
    // the agent waits the shortest time again (without the reset: 0.5, 1, 2 s).
    let logged = std::fs::read_to_string(&log).unwrap();
    let fresh = logged.matches("retrying in 0.5 s").count();
    assert!(fresh >= 3, "{fresh} fresh waits in:\n{logged}");
    backer_testkit::figures(
        "outages",
        format!("agent reconnects after three server restarts: {reconnect:?}"),
    );
}

/// SIGTERM (a pod deleted, a rolling update) cancels the agent's running
/// backup: the job ends failed with that reason at once, not "disconnected"
/// later; the agent exits 0 within seconds; the next backup is whole.
#[test]
fn sigterm_cancels_the_agents_backup_and_the_job_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "");
    server.admin_cert();
    let state = tmp.join("agent");
    server.enrol("host", &state);
    let log = tmp.join("agent.log");
    // 1 MiB/s: the backup of 16 MiB is under way when the signal comes.
    let mut agent = run_agent(&state, &["--limit-upload", "1024"], &log);
    server.wait_connected("host");
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big"), pseudo_random(16 << 20, 11)).unwrap();
    ok(server.cli(&["backup", "host", src.to_str().unwrap()]));
    wait_for("the backup to move data", || {
        json(ok(server.cli(&["jobs", "--json"])))
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "running" && j["bytes_done"].as_u64().unwrap_or(0) > 0)
    });

    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "the agent did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped_in = signalled.elapsed();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "the agent exits 0 on SIGTERM: {status}\n{logged}"
    );
    assert!(logged.contains("jobs under way are cancelled"), "{logged}");

    let jobs = json(ok(server.cli(&["jobs", "--json"])));
    let job = &jobs.as_array().unwrap()[0];
    assert_eq!(job["state"], "failed", "{job}");
    let why = job["messages"][0].as_str().unwrap_or_default();
    assert!(
        why.starts_with("cancelled: the agent was stopped") && why.contains("no snapshot was saved"),
        "the job says it was cancelled, not that the agent vanished: {job}"
    );
    let snapshots = json(ok(server.cli(&["snapshots", "host", "--json"])));
    assert_eq!(
        snapshots.as_array().map(Vec::len),
        Some(0),
        "no snapshot after a cancel: {snapshots}"
    );

    // The next agent's backup is whole.
    let _agent = run_agent(&state, &[], &tmp.join("agent2.log"));
    server.wait_connected("host");
    assert!(ok(server.cli(&["backup", "host", src.to_str().unwrap(), "--wait"])).contains("succeeded"));
    backer_testkit::figures(
        "outages",
        format!(
            "agent stopped by SIGTERM during a backup: exited in {stopped_in:?}, the job failed with its reason"
        ),
    );
}
