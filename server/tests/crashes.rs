//! SIGKILL at random moments: the server, the agent, or a `backer` process
//! working on the same repository, during a backup, a restore or a prune.
//! After each kill the killed process is started again, the next backup and
//! restore succeed (the restore byte-identical), and `check --read-data`
//! passes. One seed per round; `BACKER_CRASH_ROUNDS=200` runs more.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backer_testkit::{
    Running, Server, ServerSetup, agent, bin, compare_trees, json, ok, pseudo_random, wait_for,
};

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The agent, uploading at 12 MiB/s so that a backup lasts long enough to be
/// interrupted.
fn start_agent(state: &Path) -> Running {
    Running(
        agent(state, &["run", "--limit-upload", "12288"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `backer --repo` on the server's repository, with its password.
fn local(server: &Server, args: &[&str]) -> Command {
    let pw = std::fs::read_to_string(server.dir.join("state/repository-password")).unwrap();
    let mut c = Command::new(bin("backer"));
    c.arg("--repo")
        .arg(server.dir.join("repo"))
        .args(args)
        .env("BACKER_PASSWORD", pw.trim())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn active_jobs(server: &Server) -> usize {
    json(ok(server.cli(&["jobs", "--json"])))
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "running" || j["state"] == "queued")
        .count()
}

/// Rewrites part of the source, differently each round.
fn change_source(src: &Path, round: u64) {
    std::fs::create_dir_all(src.join("small")).unwrap();
    for big in [round % 3, (round + 1) % 3] {
        std::fs::write(
            src.join(format!("big{big}")),
            pseudo_random(6 << 20, round * 7 + big),
        )
        .unwrap();
    }
    for i in 0..40 {
        let data = pseudo_random(1000 + (i as usize * 37), round * 1000 + i);
        std::fs::write(src.join(format!("small/f{}", (round * 13 + i) % 150)), data).unwrap();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Server,
    Agent,
    Cli,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Backup,
    Restore,
    Prune,
}

#[test]
fn kills_at_random_moments_lose_nothing() {
    let rounds: u64 = std::env::var("BACKER_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let setup = ServerSetup {
        log: Some(tmp.join("server.log")),
        ..Default::default()
    };
    let mut server = Server::start_with(tmp, setup.clone());
    server.admin_cert();
    let state = tmp.join("agent");
    server.enrol("host", &state);
    let mut agent_proc = start_agent(&state);
    server.wait_connected("host");

    let src = tmp.join("src");
    for i in 0..3 {
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join(format!("big{i}")), pseudo_random(4 << 20, 100 + i)).unwrap();
    }
    change_source(&src, 0);
    let src_arg = src.to_str().unwrap().to_string();
    assert!(ok(server.cli(&["backup", "host", &src_arg, "--wait"])).contains("succeeded"));
    let started = Instant::now();
    let mut rng = Rng(0x0c4a_5417);
    let mut kills: BTreeMap<(Victim, Op), (u32, u32)> = BTreeMap::new();

    for round in 0..rounds {
        change_source(&src, round + 1);
        let victim = match rng.below(3) {
            0 => Victim::Server,
            1 => Victim::Agent,
            _ => Victim::Cli,
        };
        let op = match (victim, rng.below(3)) {
            (Victim::Cli, 0) => Op::Prune,
            (_, 0 | 1) => Op::Backup,
            _ => Op::Restore,
        };
        // Within how long the operation usually takes here.
        let window = match (victim, op) {
            (Victim::Cli, Op::Backup) => 250,
            (Victim::Cli, Op::Restore) => 120,
            (Victim::Cli, Op::Prune) => 300,
            (_, Op::Backup) => 800,
            (_, _) => 60,
        };
        let delay = Duration::from_millis(rng.below(window));
        let target = tmp.join(format!("killed-restore-{round}"));
        let target_arg = target.to_str().unwrap().to_string();

        // Start the operation.
        let mut cli: Option<Child> = match (victim, op) {
            (Victim::Cli, Op::Backup) => Some(local(&server, &["backup", "-q", &src_arg]).spawn().unwrap()),
            (Victim::Cli, Op::Restore) => Some(
                local(&server, &["restore", "-q", "latest", "--target", &target_arg])
                    .spawn()
                    .unwrap(),
            ),
            (Victim::Cli, Op::Prune) => {
                ok(
                    local(&server, &["forget", "-q", "--keep-last", "2", "--group-by", ""])
                        .output()
                        .unwrap(),
                );
                Some(
                    local(&server, &["prune", "-q", "--max-unused", "0%"])
                        .spawn()
                        .unwrap(),
                )
            }
            (_, Op::Backup) => {
                ok(server.cli(&["backup", "host", &src_arg, "--json"]));
                None
            }
            (_, Op::Restore) => {
                ok(server.cli(&[
                    "restore",
                    "latest",
                    "--client",
                    "host",
                    "--target",
                    &target_arg,
                    "--json",
                ]));
                None
            }
            (_, Op::Prune) => unreachable!("prune runs in the CLI"),
        };
        std::thread::sleep(delay);

        // Kill the victim and start it again.
        let mid_operation = match victim {
            Victim::Server => {
                let busy = active_jobs(&server) > 0;
                server = Server::restart(server, &setup);
                busy
            }
            Victim::Agent => {
                let busy = active_jobs(&server) > 0;
                drop(agent_proc);
                agent_proc = start_agent(&state);
                busy
            }
            Victim::Cli => {
                let c = cli.as_mut().unwrap();
                let busy = c.try_wait().unwrap().is_none();
                c.kill().unwrap();
                c.wait().unwrap();
                busy
            }
        };
        let e = kills.entry((victim, op)).or_default();
        e.0 += 1;
        e.1 += u32::from(mid_operation);
        wait_for("interrupted jobs to end", || active_jobs(&server) == 0);
        server.wait_connected("host");

        // The next backup and restore succeed, and the restore is exact.
        let out = ok(server.cli(&["backup", "host", &src_arg, "--wait"]));
        assert!(
            out.contains("succeeded"),
            "round {round} ({victim:?} killed in {op:?}): {out}"
        );
        let restored = tmp.join(format!("restored-{round}"));
        let out = ok(server.cli(&[
            "restore",
            "latest",
            "--client",
            "host",
            "--target",
            restored.to_str().unwrap(),
            "--wait",
        ]));
        assert!(out.contains("succeeded"), "round {round}: {out}");
        let diffs = compare_trees(&src, &restored.join(src.strip_prefix("/").unwrap()));
        assert!(
            diffs.is_empty(),
            "round {round} ({victim:?} killed in {op:?}): restore differs:\n{}",
            diffs.join("\n")
        );
        let _ = std::fs::remove_dir_all(&restored);
        let _ = std::fs::remove_dir_all(&target);

        // And the repository checks clean, reading every pack.
        let check = json(ok(local(&server, &["check", "--read-data", "--json"])
            .output()
            .unwrap()));
        assert_eq!(
            check["ok"], true,
            "round {round} ({victim:?} killed in {op:?}): {check}"
        );
    }

    let total: u32 = kills.values().map(|k| k.0).sum();
    let mid: u32 = kills.values().map(|k| k.1).sum();
    let detail: Vec<String> = kills
        .iter()
        .map(|((v, o), (n, m))| format!("{v:?} in {o:?}: {n} ({m} mid-operation)"))
        .collect();
    backer_testkit::figures(
        "crashes",
        format!(
            "{total} SIGKILLs survived, {mid} of them mid-operation, in {:.0} s [{}]; after each, a backup and an exact restore succeeded and check --read-data passed",
            started.elapsed().as_secs_f64(),
            detail.join(", ")
        ),
    );
    assert!(
        mid * 2 >= total,
        "most kills should land while work is running: {mid} of {total}"
    );
    for v in [Victim::Server, Victim::Agent, Victim::Cli] {
        assert!(
            kills.iter().any(|((kv, _), (_, m))| *kv == v && *m > 0),
            "no {v:?} was killed mid-operation"
        );
    }
}
