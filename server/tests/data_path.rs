//! FC_3–FC_5 through real processes on 127.0.0.1: a backer-server, two
//! backer-agents and the backer CLI over mutual TLS. Backups and restores
//! with every restored byte checked, on a directory and on moto's S3; the
//! refusals an admin or a hostile agent meets; agents and the server killed
//! mid-backup; schedules firing on a test clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use backer_testkit::{
    Moto, Running, Server, ServerSetup, agent, build_rich_tree, compare_trees, err, json, ok, pseudo_random,
    wait_for,
};
use serde_json::Value;

fn run_agent(state: &Path, restore_roots: &[&Path]) -> Running {
    run_agent_with(state, restore_roots, &[])
}

fn run_agent_with(state: &Path, restore_roots: &[&Path], extra: &[&str]) -> Running {
    let mut args = vec!["run".to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    for r in restore_roots {
        args.push("--restore-root".into());
        args.push(r.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Running(agent(state, &args).stderr(Stdio::null()).spawn().unwrap())
}

/// The repository as the server holds it, opened with its password file.
fn repo_cli(server: &Server, repo: &str, env: &[(String, String)], args: &[&str]) -> String {
    let pw = std::fs::read_to_string(server.dir.join("state/repository-password")).unwrap();
    ok(std::process::Command::new(backer_testkit::bin("backer"))
        .args(["--repo", repo])
        .args(args)
        .env("BACKER_PASSWORD", pw.trim())
        .env("XDG_CACHE_HOME", server.dir.join("cli-cache"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap())
}

fn snapshot_ids(server: &Server, client: &str) -> Vec<String> {
    json(ok(server.cli(&["snapshots", client, "--json"])))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// Backs up, restores whole and in part, onto the same and another client,
/// and checks the refusals, with the repository at `repository`.
fn round_trip(tmp: &Path, repository: Option<String>, env: Vec<(String, String)>) {
    let setup = ServerSetup {
        repository: repository.clone(),
        env: env.clone(),
        ..Default::default()
    };
    let server = Server::start_with(tmp, setup);
    server.admin_cert();
    let (s1, s2) = (tmp.join("agent-web1"), tmp.join("agent-db1"));
    server.enrol("web1", &s1);
    server.enrol("db1", &s2);
    let allowed = tmp.join("db1-restores");
    let _a1 = run_agent(&s1, &[]);
    let _a2 = run_agent(&s2, &[&allowed]);
    server.wait_connected("web1");
    server.wait_connected("db1");

    let src = tmp.join("src");
    build_rich_tree(&src);
    std::fs::create_dir_all(src.join("cache")).unwrap();
    std::fs::write(src.join("cache/junk.tmp"), b"excluded").unwrap();
    let src_s = src.to_str().unwrap();

    // FC_3: a backup on demand, waited for, with an exclude.
    let out = ok(server.cli(&["backup", "web1", src_s, "--exclude", "cache", "--wait"]));
    assert!(out.contains("succeeded"), "{out}");
    let snaps = snapshot_ids(&server, "web1");
    assert_eq!(snaps.len(), 1);
    assert!(
        snapshot_ids(&server, "db1").is_empty(),
        "one client's snapshots are not another's"
    );

    // Unchanged: the second backup reads no file again and stores almost nothing.
    ok(server.cli(&["backup", "web1", src_s, "--exclude", "cache", "--wait"]));
    let repo = repository.unwrap_or_else(|| tmp.join("repo").display().to_string());
    let listed = json(repo_cli(&server, &repo, &env, &["snapshots", "--json"]));
    let latest = listed.as_array().unwrap().last().unwrap().clone();
    assert_eq!(latest["hostname"], "web1", "snapshots carry the client's name");
    assert_eq!(latest["summary"]["files_read"], 0, "{latest}");
    assert!(
        latest["parent"].is_string(),
        "the first snapshot was the parent: {latest}"
    );

    // FC_5: listing files through the server.
    let ls = ok(server.cli(&["ls", "latest", "--client", "web1"]));
    assert!(ls.contains("/src/docs/nested/deeper/note.md"), "{ls}");
    assert!(!ls.contains("junk.tmp"), "excluded files are not in the snapshot");

    // FC_4: a full restore into another directory, every byte and attribute checked.
    let target = tmp.join("restored");
    let out = ok(server.cli(&[
        "restore",
        "latest",
        "--client",
        "web1",
        "--target",
        target.to_str().unwrap(),
        "--wait",
    ]));
    assert!(out.contains("succeeded"), "{out}");
    std::fs::remove_dir_all(src.join("cache")).unwrap();
    let restored = target.join(src.strip_prefix("/").unwrap());
    let diffs = compare_trees(&src, &restored);
    assert!(diffs.is_empty(), "restored tree differs: {diffs:#?}");

    // Chosen files only, onto the other client, inside what it may write.
    let one = src.join("docs/nested/deeper/note.md");
    let partial = allowed.join("partial");
    ok(server.cli(&[
        "restore",
        &snaps[0][..8],
        "--include",
        one.to_str().unwrap(),
        "--to-client",
        "db1",
        "--target",
        partial.to_str().unwrap(),
        "--wait",
    ]));
    let got = partial.join(one.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&one).unwrap());
    let others: Vec<_> = walkdir(&partial).into_iter().filter(|p| p.is_file()).collect();
    assert_eq!(others, vec![got], "only the included file is restored");

    // Refusals: outside the agent's restore roots, unknown snapshot and
    // client, relative paths, no target, existing files without --overwrite.
    let e = err(&server.cli(&[
        "restore",
        "latest",
        "--client",
        "web1",
        "--to-client",
        "db1",
        "--target",
        "/etc/backer-test",
        "--wait",
    ]));
    assert!(e.contains("may restore only below"), "{e}");
    let e = err(&server.cli(&["restore", "deadbeef", "--target", "/tmp/x"]));
    assert!(e.contains("no snapshot matches"), "{e}");
    let e = err(&server.cli(&["backup", "nosuch", "/etc"]));
    assert!(e.contains("no client named nosuch"), "{e}");
    let e = err(&server.cli(&["backup", "web1", "relative/path"]));
    assert!(e.contains("is not absolute"), "{e}");
    let e = err(&server.cli(&["backup", "web1", "/a/../etc"]));
    assert!(e.contains("contains `..`"), "{e}");
    let e = err(&server.cli(&["restore", "latest", "--target", "/tmp/x"]));
    assert!(e.contains("`latest` needs a client"), "{e}");
    let again = server.cli(&[
        "restore",
        "latest",
        "--client",
        "web1",
        "--target",
        target.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(
        again.status.code(),
        Some(3),
        "partial restore exits 3: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("use --overwrite"));

    // FC_4 from the client side: the host asks for its own backup and restore.
    std::fs::write(src.join("from-agent.txt"), b"asked by the host").unwrap();
    let out = ok(agent(&s1, &["backup", src_s]).output().unwrap());
    assert!(out.contains("succeeded"), "{out}");
    let mine = tmp.join("agent-restore");
    let out = ok(
        agent(&s1, &["restore", "latest", "--target", mine.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(
        std::fs::read(mine.join(src.strip_prefix("/").unwrap()).join("from-agent.txt")).unwrap(),
        b"asked by the host"
    );
    // A host cannot restore onto another.
    let e = err(&agent(
        &s2,
        &["restore", &snaps[0][..8], "--target", allowed.to_str().unwrap()],
    )
    .output()
    .unwrap());
    assert!(
        e.contains("no snapshot matches"),
        "db1 cannot see web1's snapshots: {e}"
    );

    // An S3 repository's index, snapshots and trees are kept beside the
    // server's state, so a restart does not read them all again.
    if repo.starts_with("s3://") {
        let cache = server.dir.join("state/cache");
        assert!(cache.join("CACHEDIR.TAG").is_file());
        let kept: Vec<String> = walkdir(&cache)
            .iter()
            .filter(|p| p.is_file())
            .map(|p| p.strip_prefix(&cache).unwrap().to_string_lossy().into_owned())
            .collect();
        for folder in ["/index/", "/snapshots/", "/data/"] {
            assert!(kept.iter().any(|k| k.contains(folder)), "no {folder} in {kept:?}");
        }
    }

    // The server's repository checks clean, every byte read.
    let check = repo_cli(&server, &repo, &env, &["check", "--read-data"]);
    assert!(check.contains("no errors"), "{check}");

    // Jobs are listed with who asked.
    let jobs = json(ok(server.cli(&["jobs", "--json"])));
    let origins: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["origin"].as_str().unwrap())
        .collect();
    assert!(
        origins.contains(&"admin:ops") && origins.contains(&"agent"),
        "{origins:?}"
    );
}

fn walkdir(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

#[test]
fn backup_and_restore_through_the_server_on_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    round_trip(tmp.path(), None, Vec::new());
}

#[test]
fn backup_and_restore_through_the_server_on_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    moto.create_bucket("server");
    let env = Moto::env()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    round_trip(tmp.path(), Some(moto.url("server", "repo")), env);
}

/// A job killed mid-way fails with its reason and leaves no snapshot.
#[test]
fn interrupted_backups_fail_and_leave_no_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let setup = ServerSetup::default();
    let server = Server::start_with(tmp, setup.clone());
    server.admin_cert();
    let state = tmp.join("agent");
    server.enrol("big", &state);
    // Uploads limited to 4 MiB/s, so the backup is still running when killed.
    let slow = ["--limit-upload", "4096"];
    let agent_proc = run_agent_with(&state, &[], &slow);
    server.wait_connected("big");
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        std::fs::write(src.join(format!("f{i}")), pseudo_random(16 << 20, i)).unwrap();
    }
    let running = |server: &Server| {
        json(ok(server.cli(&["jobs", "--json"])))
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "running" && j["bytes_done"].as_u64().unwrap_or(0) > 0)
    };

    // Starts a backup and returns its job id once it is moving data.
    let start_backup = |server: &Server| {
        let out = json(ok(server.cli(&[
            "backup",
            "big",
            src.to_str().unwrap(),
            "--json",
        ])));
        wait_for("the backup to make progress", || running(server));
        out["id"].as_str().unwrap().to_string()
    };

    // The agent dies.
    let job = start_backup(&server);
    drop(agent_proc);
    wait_for("the job to fail", || {
        json(ok(server.cli(&["jobs", "--json"])))
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == job.as_str() && j["state"] == "failed")
    });
    let jobs = ok(server.cli(&["jobs", "--json"]));
    assert!(jobs.contains("disconnected; no snapshot was written"), "{jobs}");
    assert!(snapshot_ids(&server, "big").is_empty());

    // The server dies; after its restart the job is failed, not running.
    let agent_proc = run_agent_with(&state, &[], &slow);
    server.wait_connected("big");
    let job = start_backup(&server);
    let server = Server::restart(server, &setup);
    let jobs = json(ok(server.cli(&["jobs", "--json"])));
    let j = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job.as_str())
        .unwrap();
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["messages"].to_string().contains("server stopped"), "{j}");
    assert!(
        snapshot_ids(&server, "big").is_empty(),
        "no half snapshot is listed"
    );

    // The agent reconnects by itself and the next backup completes.
    server.wait_connected("big");
    drop(agent_proc);
    let _agent = run_agent(&state, &[]);
    server.wait_connected("big");
    let out = ok(server.cli(&["backup", "big", src.to_str().unwrap(), "--wait"]));
    assert!(out.contains("succeeded"), "{out}");
    let restored = tmp.join("restored");
    ok(server.cli(&[
        "restore",
        "latest",
        "--client",
        "big",
        "--target",
        restored.to_str().unwrap(),
        "--wait",
    ]));
    assert!(compare_trees(&src, &restored.join(src.strip_prefix("/").unwrap())).is_empty());
}

/// A configured retention is applied after each backup of the client,
/// through the repository's own forget, under the job's lock, to that
/// client's snapshots of the same paths only.
#[test]
fn retention_forgets_the_clients_older_snapshots_after_a_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"kept").unwrap();
    let setup = ServerSetup {
        clients_toml: "[web1]\nBackupsIDs = [1]\n\n[db1]\nBackupsIDs = [1]\n".into(),
        backups_toml: Some(format!(
            "[site]\nID = 1\nPaths = [\"{}\"]\nRetention = {{ last = 1 }}\n",
            src.display()
        )),
        ..Default::default()
    };
    let server = Server::start_with(tmp, setup);
    server.admin_cert();
    let (s1, s2) = (tmp.join("agent-web1"), tmp.join("agent-db1"));
    server.enrol("web1", &s1);
    server.enrol("db1", &s2);
    let _a1 = run_agent(&s1, &[]);
    let _a2 = run_agent(&s2, &[]);
    server.wait_connected("web1");
    server.wait_connected("db1");

    ok(server.cli(&["backup", "db1", "--wait"]));
    // An ad-hoc backup of other paths is another group: never forgotten by
    // the configured one.
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    ok(server.cli(&["backup", "web1", other.to_str().unwrap(), "--wait"]));
    for i in 0..3 {
        std::fs::write(src.join("a.txt"), format!("version {i}")).unwrap();
        ok(server.cli(&["backup", "web1", "--wait"]));
    }
    assert_eq!(
        snapshot_ids(&server, "web1").len(),
        2,
        "the newest of the site, and the other paths"
    );
    assert_eq!(
        snapshot_ids(&server, "db1").len(),
        1,
        "another client's snapshots stay"
    );
    let jobs = json(ok(server.cli(&["jobs", "--json"])));
    let said: Vec<String> = jobs
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|j| j["messages"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m.as_str().map(str::to_string))
        .filter(|m| m.starts_with("retention: forgot 1 "))
        .collect();
    assert_eq!(said.len(), 2, "each later backup forgot the one before: {jobs}");
}

fn scheduled_jobs(server: &Server) -> Vec<Value> {
    json(ok(server.cli(&["jobs", "--json"])))
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["origin"].as_str().unwrap_or("").starts_with("schedule:"))
        .cloned()
        .collect()
}

/// Schedules fire when the TOML (or a cron expression) says, on the
/// server's clock, which the test starts 15 s before the time: long enough
/// for the agent to enrol and connect on a loaded machine.
#[test]
fn schedules_fire_at_their_time() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"scheduled").unwrap();
    let clients = "[web1]\nBackupsIDs = [1]\nSchedulesIDs = [1, 2]\n";
    let backups = format!(
        "[site]\nID = 1\nPaths = [\"{}\"]\nExcluded = [\"*.tmp\"]\nRetention = {{ last = 1 }}\n",
        src.display()
    );
    // Daily at 02:00 and, by cron, Mondays at 04:30 (2026-01-05 is a Monday).
    let schedules = "[nightly]\nID = 1\nFrequency = \"daily\"\nHour = \"02:00:00\"\n\n\
                     [monday]\nID = 2\nFrequency = \"30 4 * * 1\"\n";
    for (start, fires_at, id) in [
        ("2026-01-05T01:59:45Z", "2026-01-05T02:00:0", "schedule:1"),
        ("2026-01-05T04:29:45Z", "2026-01-05T04:30:0", "schedule:2"),
    ] {
        let dir = tmp.join(id.replace(':', "-"));
        let setup = ServerSetup {
            clients_toml: clients.into(),
            backups_toml: Some(backups.clone()),
            schedules_toml: Some(schedules.into()),
            args: vec!["--clock-start".into(), start.into()],
            ..Default::default()
        };
        let server = Server::start_with(&dir, setup);
        server.admin_cert();
        let state = dir.join("agent");
        server.enrol("web1", &state);
        let _agent = run_agent(&state, &[]);
        server.wait_connected("web1");
        assert!(
            scheduled_jobs(&server).is_empty(),
            "nothing fires before its time"
        );
        wait_for("the schedule to fire", || !scheduled_jobs(&server).is_empty());
        wait_for("the scheduled backup to end", || {
            scheduled_jobs(&server).iter().all(|j| j["state"] == "succeeded")
        });
        let jobs = scheduled_jobs(&server);
        assert_eq!(jobs.len(), 1, "fires once: {jobs:?}");
        assert_eq!(jobs[0]["origin"], id);
        let created = chrono::DateTime::from_timestamp(jobs[0]["created"].as_i64().unwrap(), 0).unwrap();
        assert!(
            created.to_rfc3339().starts_with(fires_at),
            "fired at {created}, expected {fires_at}x"
        );
        // The configured paths were backed up; an extra manual run of the
        // configured backup then leaves one snapshot (Retention last = 1).
        std::thread::sleep(Duration::from_millis(1100));
        let o = server.cli(&["backup", "web1", "--wait"]);
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && said.contains("forgot 1 older"), "{said}");
        assert_eq!(snapshot_ids(&server, "web1").len(), 1);
        let ls = ok(server.cli(&["ls", "latest", "--client", "web1"]));
        assert!(ls.contains("a.txt"), "{ls}");
    }
}

/// An agent that lies gets refused at every step, and what it did leaves
/// no snapshot: it is driven here by hand with its own certificate.
#[test]
fn a_hostile_agent_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "");
    server.admin_cert();
    let (evil, good) = (tmp.join("evil"), tmp.join("good"));
    server.enrol("evil", &evil);
    server.enrol("good", &good);
    let _good = run_agent(&good, &[]);
    server.wait_connected("good");
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("secret.txt"), b"good's data").unwrap();
    ok(server.cli(&["backup", "good", src.to_str().unwrap(), "--wait"]));
    let good_job = json(ok(server.cli(&["jobs", "good", "--json"])))[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use backer_proto::v1 as pb;
        let read = |n: &str| std::fs::read_to_string(evil.join(n)).unwrap();
        let channel = backer_proto::connect(
            &server.data,
            &read("ca.pem"),
            Some((&read("cert.pem"), &read("key.pem"))),
        )
        .await
        .unwrap();
        let mut c = pb::agent_client::AgentClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::AgentReport {
            report: Some(pb::agent_report::Report::Hello(pb::Hello::default())),
        })
        .await
        .unwrap();
        let mut work = c
            .work(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        server.wait_connected("evil");
        let started = json(ok(server.cli(&["backup", "evil", "/etc", "--json"])));
        let job = started["id"].as_str().unwrap().to_string();
        let item = work.message().await.unwrap().unwrap();
        assert_eq!(item.job_id, job);

        // Another client's job is not reachable, running or not.
        let e = c
            .missing(pb::MissingRequest {
                job_id: good_job.clone(),
                ids: vec![],
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("is not a running job of client evil"), "{e}");

        // A chunk under a false id, and one claiming a huge size, are refused.
        let k = c.chunk_keys(pb::ChunkKeysRequest {}).await.unwrap().into_inner();
        let keys =
            backer_repo::crypto::ChunkKeys::from_parts(k.id_key[..].try_into().unwrap(), k.chunker_seed);
        let mut compressor = backer_repo::chunk::Compressor::new(k.zstd_level).unwrap();
        let claimed = backer_repo::chunk::blob_id(&keys, b"good's data");
        let upload = |id: backer_repo::id::BlobId, payload: Vec<u8>, raw_len: u32| {
            let mut c = c.clone();
            let job = job.clone();
            async move {
                let msg = pb::UploadBatch {
                    job_id: job,
                    chunks: vec![pb::UploadChunk {
                        id: id.0.to_vec().into(),
                        kind: 0,
                        payload: payload.into(),
                        raw_len,
                    }],
                };
                c.upload(futures::stream::iter(vec![msg])).await
            }
        };
        let e = upload(claimed, compressor.compress(b"evil's data"), 11)
            .await
            .unwrap_err();
        assert!(e.message().contains("does not hash to its id"), "{e}");
        let e = upload(claimed, vec![1, 0, 0], u32::MAX).await.unwrap_err();
        assert!(e.message().contains("more than a Data blob may hold"), "{e}");

        // Trees outside the job are not readable.
        let e = c
            .read_tree(pb::ReadTreeRequest {
                job_id: job.clone(),
                id: claimed.0.to_vec().into(),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("is not part of what job"), "{e}");

        // A snapshot whose tree was never uploaded is not written.
        let snap = backer_repo::snapshot::Snapshot {
            time: chrono::Utc::now(),
            hostname: "good".into(),
            username: "root".into(),
            paths: vec!["/etc".into()],
            tags: vec![],
            excludes: vec![],
            parent: None,
            tree: claimed,
            partial: false,
            summary: Default::default(),
            errors: vec![],
            program_version: "evil".into(),
        };
        let e = c
            .finish_backup(pb::FinishBackupRequest {
                job_id: job.clone(),
                snapshot_json: serde_json::to_string(&snap).unwrap(),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("was never uploaded"), "{e}");
        drop(tx);
    });
    let jobs = json(ok(server.cli(&["jobs", "evil", "--json"])));
    assert_eq!(jobs[0]["state"], "failed", "{jobs}");
    assert!(snapshot_ids(&server, "evil").is_empty());
    assert_eq!(
        snapshot_ids(&server, "good").len(),
        1,
        "good's snapshots are untouched"
    );
}

/// Disaster recovery: a host loses its disk (agent state and data), is
/// re-enrolled under the same name, and gets its last backup back in place.
#[test]
fn a_lost_host_is_reenrolled_and_restored_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let server = Server::start(tmp, "");
    server.admin_cert();
    let state = tmp.join("agent");
    server.enrol("web1", &state);
    let agent_proc = run_agent(&state, &[]);
    server.wait_connected("web1");
    let src = tmp.join("host/data");
    build_rich_tree(&src);
    ok(server.cli(&["backup", "web1", src.to_str().unwrap(), "--wait"]));
    let reference = tmp.join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    assert!(
        std::process::Command::new("cp")
            .args(["-a", "--"])
            .arg(&src)
            .arg(&reference)
            .status()
            .unwrap()
            .success()
    );

    // The disk is gone.
    drop(agent_proc);
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::remove_dir_all(tmp.join("host")).unwrap();

    let bundle = tmp.join("web1-again.json");
    ok(server.cli(&[
        "clients",
        "reenroll",
        "web1",
        "--bundle-out",
        bundle.to_str().unwrap(),
    ]));
    ok(agent(&state, &["enroll", "--bundle", bundle.to_str().unwrap()])
        .output()
        .unwrap());
    let _agent = run_agent(&state, &[]);
    server.wait_connected("web1");
    let out = ok(server.cli(&["restore", "latest", "--client", "web1", "--target", "/", "--wait"]));
    assert!(out.contains("succeeded"), "{out}");
    let diffs = compare_trees(&reference.join("data"), &src);
    assert!(diffs.is_empty(), "restored in place differs: {diffs:#?}");

    // The REST port: JSON views for the admin only, metrics without names.
    let (code, _) = server.http_get("/api/v1/jobs");
    assert_eq!(code, 401, "the JSON views need the login");
    let (code, body) = server.http_get_auth("/api/v1/jobs", "admin", "s3cret");
    assert_eq!(code, 200, "{body}");
    let jobs = json(body);
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");
    let (code, body) = server.http_get_auth("/api/v1/snapshots", "admin", "s3cret");
    assert_eq!(code, 200);
    assert!(body.contains("\"hostname\":\"web1\""), "{body}");
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        metrics.contains("backer_jobs{kind=\"backup\",state=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("backer_jobs{kind=\"restore\",state=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("backer_dedup_ratio"), "{metrics}");
    assert!(!metrics.contains("web1"), "metrics name no client");
}

/// FC_1's development switch: no TLS anywhere, said loudly, and it works.
#[test]
fn insecure_plaintext_works_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let log = tmp.join("server.log");
    let setup = ServerSetup {
        args: vec!["--insecure-plaintext".into()],
        log: Some(log.clone()),
        ..Default::default()
    };
    let server = Server::start_with(tmp, setup);
    let plain = |args: &[&str]| {
        std::process::Command::new(backer_testkit::bin("backer"))
            .args([
                "--server",
                &server.mgmt,
                "--login",
                "admin",
                "--insecure-plaintext",
            ])
            .args(args)
            .env("BACKER_SERVER_PASSWORD", "s3cret")
            .output()
            .unwrap()
    };
    let bundle = tmp.join("dev.json");
    ok(plain(&[
        "clients",
        "add",
        "dev",
        "--bundle-out",
        bundle.to_str().unwrap(),
    ]));
    let state = tmp.join("agent");
    ok(agent(
        &state,
        &[
            "--insecure-plaintext",
            "enroll",
            "--bundle",
            bundle.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap());
    let _agent = run_agent(&state, &[]);
    wait_for("the agent to connect in plain text", || {
        String::from_utf8_lossy(&plain(&["clients", "--json"]).stdout).contains("\"connected\":true")
    });
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"plain").unwrap();
    ok(plain(&["backup", "dev", src.to_str().unwrap(), "--wait"]));
    let target = tmp.join("restored");
    ok(plain(&[
        "restore",
        "latest",
        "--client",
        "dev",
        "--target",
        target.to_str().unwrap(),
        "--wait",
    ]));
    assert_eq!(
        std::fs::read(target.join(src.strip_prefix("/").unwrap()).join("f")).unwrap(),
        b"plain"
    );
    // A wrong password is still refused.
    let wrong = std::process::Command::new(backer_testkit::bin("backer"))
        .args([
            "--server",
            &server.mgmt,
            "--login",
            "admin",
            "--insecure-plaintext",
            "clients",
        ])
        .env("BACKER_SERVER_PASSWORD", "guess")
        .output()
        .unwrap();
    assert!(err(&wrong).contains("wrong login or password"));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("INSECURE: --insecure-plaintext is on"),
        "{logged}"
    );
}
