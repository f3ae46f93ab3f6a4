//! Writes the seed corpus from real objects: a tiny repository in a temporary
//! directory, two backups of a small tree of files (the second with a
//! parent), a lock; then each object, at every layer the targets read it, as
//! `corpus/<target>/seed-*`, and the repository's key file and config as
//! `fixtures/`. Other files in the corpus (merged finds, crash inputs) are
//! kept. The key is new each time, so the targets are rebuilt after a run:
//! `fuzz/run --seeds` does both.
//!
//! Usage: seeds [FUZZ_DIR]   (default: this crate's directory)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backer_fuzz::Layer;
use backer_fuzz::server::{AGENT_REQUESTS, MANAGEMENT_REQUESTS};
use backer_fuzz::storage::compress;
use backer_proto::ca::Ca;
use backer_proto::pki::{new_client_csr, new_csr};
use backer_proto::v1 as pb;
use backer_repo::archiver::{BackupOptions, Progress, backup};
use backer_repo::crypto::KdfParams;
use backer_repo::index::IndexFile;
use backer_repo::lock::{Lock, LockInfo};
use backer_repo::pack::{BlobType, open_blob, open_payload, read_header};
use backer_repo::repository::{Kind, open_object};
use backer_repo::snapshot::Snapshot;
use backer_repo::{Backend, Repository};
use prost::Message;
use serde::Serialize;

/// Objects larger than this are left out, to keep the corpus small.
const MAX_SEED: usize = 8 * 1024;

struct Corpus {
    dir: PathBuf,
    written: usize,
    bytes: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, name: &str, data: &[u8]) {
        if data.len() > MAX_SEED {
            return;
        }
        let dir = self.dir.join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        self.written += 1;
        self.bytes += data.len();
    }

    fn layered(&mut self, target: &str, name: &str, stored: &[u8], plain: &[u8]) {
        let compressed = zstd::bulk::compress(plain, 3).unwrap();
        for (layer, body) in [
            (Layer::Stored, stored),
            (Layer::Compressed, &compressed[..]),
            (Layer::Plain, plain),
        ] {
            let mut data = vec![layer.byte()];
            data.extend_from_slice(body);
            self.put(target, &format!("{name}-{layer:?}").to_lowercase(), &data);
        }
    }

    fn message(&mut self, target: &str, names: &[&str], which: &str, tag: &str, m: &impl Message) {
        let i = names.iter().position(|n| *n == which).unwrap();
        let mut data = vec![i as u8];
        data.extend_from_slice(&m.encode_to_vec());
        self.put(target, &format!("{which}{tag}"), &data);
    }
}

fn postcard<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap()
}

/// Every file under `dir`, with its path relative to it.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn write_sources(src: &Path) {
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello, backer\n").unwrap();
    std::fs::write(src.join("zeros.bin"), vec![0u8; 3000]).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..1500)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("noise.bin"), noise).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("sub/deeper/notes.md"), b"# notes\n".repeat(20)).unwrap();
    std::fs::write(
        src.join(std::ffi::OsStr::from_bytes(b"\xff not utf-8")),
        b"odd name",
    )
    .unwrap();
    std::os::unix::fs::symlink("hello.txt", src.join("link")).unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"end", (1 << 20) - 3).unwrap();
}

async fn run(out: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_sources(&src);
    let repo_dir = tmp.path().join("repo");
    let kdf = KdfParams {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };
    let backend = Backend::open(repo_dir.to_str().unwrap()).unwrap();
    let repo = Repository::init(backend, backer_fuzz::PASSWORD, kdf)
        .await
        .unwrap();
    let lock = Lock::acquire(&repo, false, "backup", Duration::ZERO)
        .await
        .unwrap();
    let locks = files(&repo_dir.join("locks"));
    let opts = || BackupOptions {
        root: src.clone(),
        paths: vec![PathBuf::from("/")],
        tags: vec!["seed".into()],
        hostname: Some("fuzz-host".into()),
        threads: 1,
        ..Default::default()
    };
    let first = backup(&repo, &lock, opts(), Arc::new(Progress::default()))
        .await
        .unwrap();
    std::fs::write(src.join("hello.txt"), b"hello again, backer\n").unwrap();
    std::fs::write(src.join("sub/new.txt"), b"new in the second backup\n").unwrap();
    let repo = repo.refreshed().await.unwrap();
    let second = backup(&repo, &lock, opts(), Arc::new(Progress::default()))
        .await
        .unwrap();
    lock.release().await.unwrap();
    let repo = repo.refreshed().await.unwrap();
    let key = repo.key();

    for target in std::fs::read_dir(out.join("corpus")).into_iter().flatten() {
        for f in std::fs::read_dir(target.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.file_name().unwrap().as_bytes().starts_with(b"seed-") {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let mut c = Corpus {
        dir: out.to_path_buf(),
        written: 0,
        bytes: 0,
    };

    let keys = files(&repo_dir.join("keys"));
    let [(_, key_file)] = keys.as_slice() else {
        panic!("one key file expected, found {}", keys.len());
    };
    std::fs::write(out.join("fixtures/key.json"), key_file).unwrap();
    c.put("key_file", "key", key_file);
    let config = std::fs::read(repo_dir.join("config")).unwrap();
    std::fs::write(out.join("fixtures/config"), &config).unwrap();
    c.layered("config", "config", &config, &postcard(repo.config()));

    for (i, (name, bytes)) in files(&repo_dir.join("index")).iter().enumerate() {
        let f: IndexFile = open_object(key, Kind::Index, name, bytes).unwrap();
        c.layered("index", &format!("index{i}"), bytes, &postcard(&f));
    }
    for (i, (name, bytes)) in files(&repo_dir.join("snapshots")).iter().enumerate() {
        let s: Snapshot = open_object(key, Kind::Snapshot, name, bytes).unwrap();
        c.layered("snapshot", &format!("snapshot{i}"), bytes, &postcard(&s));
        c.put(
            "snapshot_json",
            &format!("snapshot{i}"),
            &serde_json::to_vec(&s).unwrap(),
        );
    }
    for (i, (name, bytes)) in locks.iter().enumerate() {
        let l: LockInfo = open_object(key, Kind::Lock, name, bytes).unwrap();
        c.layered("lock", &format!("lock{i}"), bytes, &postcard(&l));
    }

    let mut uploads = Vec::new();
    for (p, (name, pack)) in files(&repo_dir.join("data")).iter().enumerate() {
        let entries = read_header(&key.data, pack, name).unwrap();
        let hlen = u32::from_le_bytes(pack[pack.len() - 4..].try_into().unwrap()) as usize;
        let data_end = pack.len() - 4 - hlen;
        c.put(
            "pack_header",
            &format!("pack{p}-stored"),
            &[&[0u8][..], pack].concat(),
        );
        let mut built = vec![1u8];
        built.extend_from_slice(&(data_end as u16).to_le_bytes());
        built.extend_from_slice(&pack[..data_end]);
        built.extend_from_slice(&postcard(&entries));
        c.put("pack_header", &format!("pack{p}-built"), &built);
        for (b, e) in entries.iter().enumerate() {
            let sealed = &pack[e.offset as usize..(e.offset + e.len) as usize];
            let payload = open_payload(&key.data, e, sealed).unwrap();
            let raw = open_blob(&key.data, e, sealed).unwrap();
            let kind = u8::from(e.kind == BlobType::Tree);
            let name = format!("pack{p}-blob{b}-{:?}", e.kind).to_lowercase();
            let mut blob = vec![kind];
            blob.extend_from_slice(&e.raw_len.to_le_bytes());
            blob.extend_from_slice(&payload);
            c.put("blob", &name, &blob);
            if e.kind == BlobType::Tree {
                c.put("tree", &name, &raw);
            }
            c.put(
                "upload_chunk",
                &format!("{name}-honest"),
                &[&[kind << 1][..], &raw].concat(),
            );
            let mut any = vec![1 | 2, kind];
            any.extend_from_slice(&e.raw_len.to_le_bytes());
            any.extend_from_slice(&e.id.0);
            any.extend_from_slice(&payload);
            c.put("upload_chunk", &format!("{name}-any"), &any);
            if raw.len() <= 4096 {
                uploads.push(pb::UploadChunk {
                    id: e.id.0.to_vec().into(),
                    kind: u32::from(kind),
                    payload: compress(&raw).into(),
                    raw_len: raw.len() as u32,
                });
            }
        }
    }

    let (_, csr_pem) = new_csr().unwrap();
    let (_, node_csr) = new_client_csr("node-1").unwrap();
    let csr_der = backer_fuzz::der_of(&csr_pem).unwrap();
    c.put("csr", "pem", &[b"\0", csr_pem.as_bytes()].concat());
    c.put("csr", "pem-client", &[b"\0", node_csr.as_bytes()].concat());
    c.put("csr", "der", &[&[1u8][..], &csr_der].concat());
    let ca = Ca::create("seed").unwrap();
    let client = ca.sign_client("node-1", &csr_pem).unwrap();
    let admin = ca.issue_admin("alice", 1).unwrap();
    let server = ca.issue_server(&["backer.example".into()]).unwrap();
    for (name, pem) in [
        ("client", &client.cert_pem),
        ("admin", &admin.cert_pem),
        ("server", &server.cert_pem),
    ] {
        let der = backer_fuzz::der_of(pem).unwrap();
        c.put("csr", &format!("cert-{name}"), &[&[2u8][..], &der].concat());
    }

    let snap_json = serde_json::to_string(&second.snapshot).unwrap();
    let tree_id = first.snapshot.tree.0.to_vec();
    let ids: Vec<_> = uploads.iter().map(|u| u.id.clone()).collect();
    let job = "7f3a9c2e".to_string();
    let a = "agent_requests";
    let m = &AGENT_REQUESTS;
    c.message(
        a,
        m,
        "enroll",
        "",
        &pb::EnrollRequest {
            token: "tok-0123456789abcdef".into(),
            csr_pem: csr_pem.clone(),
            agent_version: "0.1.0".into(),
        },
    );
    c.message(
        a,
        m,
        "renew",
        "",
        &pb::RenewRequest {
            csr_pem: node_csr.clone(),
        },
    );
    use pb::agent_report::Report;
    for (tag, report) in [
        (
            "-hello",
            Report::Hello(pb::Hello {
                agent_version: "0.1.0".into(),
                hostname: "node-1".into(),
            }),
        ),
        (
            "-progress",
            Report::Progress(pb::JobProgress {
                job_id: job.clone(),
                files_done: 3,
                bytes_done: 4096,
                files_total: 10,
                bytes_total: 1 << 20,
            }),
        ),
        (
            "-done",
            Report::Done(pb::JobDone {
                job_id: job.clone(),
                ok: false,
                messages: vec!["failed to read /etc/shadow".into()],
                snapshot_id: String::new(),
            }),
        ),
    ] {
        c.message(
            a,
            m,
            "agent_report",
            tag,
            &pb::AgentReport { report: Some(report) },
        );
    }
    c.message(a, m, "chunk_keys", "", &pb::ChunkKeysRequest {});
    c.message(
        a,
        m,
        "missing",
        "",
        &pb::MissingRequest {
            job_id: job.clone(),
            ids: ids.clone(),
        },
    );
    c.message(
        a,
        m,
        "upload_batch",
        "",
        &pb::UploadBatch {
            job_id: job.clone(),
            chunks: uploads.iter().take(3).cloned().collect(),
        },
    );
    c.message(
        a,
        m,
        "read_tree",
        "",
        &pb::ReadTreeRequest {
            job_id: job.clone(),
            id: tree_id.into(),
        },
    );
    c.message(
        a,
        m,
        "finish_backup",
        "",
        &pb::FinishBackupRequest {
            job_id: job.clone(),
            snapshot_json: snap_json,
        },
    );
    c.message(
        a,
        m,
        "read_chunks",
        "",
        &pb::ReadChunksRequest {
            job_id: job.clone(),
            ids,
        },
    );
    let backup_req = pb::StartBackupRequest {
        client: "node-1".into(),
        paths: vec!["/etc".into(), "/var/lib/app/".into()],
        excludes: vec![
            "*.tmp".into(),
            "/var/lib/app/cache".into(),
            "{a,b}/**/[!x]?".into(),
        ],
        tags: vec!["daily".into()],
        root: "/var/lib/kubelet/pods/uid/volumes/pv".into(),
        retention: Some(pb::Retention {
            keep_last: 3,
            keep_daily: 7,
            ..Default::default()
        }),
    };
    let restore_req = pb::StartRestoreRequest {
        snapshot: "latest".into(),
        client: "node-1".into(),
        to_client: "node-2".into(),
        target: "/srv/restore/./here/".into(),
        includes: vec!["/etc/hosts".into(), "/home".into()],
        overwrite: true,
    };
    use pb::request_job_request::Job;
    c.message(
        a,
        m,
        "request_job",
        "-backup",
        &pb::RequestJobRequest {
            job: Some(Job::Backup(backup_req.clone())),
        },
    );
    c.message(
        a,
        m,
        "request_job",
        "-restore",
        &pb::RequestJobRequest {
            job: Some(Job::Restore(restore_req.clone())),
        },
    );

    let a = "management_requests";
    let m = &MANAGEMENT_REQUESTS;
    c.message(a, m, "list_clients", "", &pb::ListClientsRequest {});
    c.message(
        a,
        m,
        "add_client",
        "",
        &pb::AddClientRequest {
            name: "web-1.example.com".into(),
            reenroll: true,
        },
    );
    c.message(
        a,
        m,
        "remove_client",
        "",
        &pb::RemoveClientRequest { name: "web-1".into() },
    );
    c.message(a, m, "start_backup", "", &backup_req);
    c.message(a, m, "start_restore", "", &restore_req);
    c.message(
        a,
        m,
        "list_jobs",
        "",
        &pb::ListJobsRequest {
            client: "node-1".into(),
        },
    );
    c.message(a, m, "watch_job", "", &pb::WatchJobRequest { id: job.clone() });
    c.message(
        a,
        m,
        "list_snapshots",
        "",
        &pb::ListSnapshotsRequest {
            client: "node-1".into(),
        },
    );
    c.message(
        a,
        m,
        "list_files",
        "",
        &pb::ListFilesRequest {
            snapshot: second.id.to_hex()[..8].to_string(),
            client: "node-1".into(),
            path: "/sub/deeper".into(),
        },
    );
    c.message(a, m, "cert_status", "", &pb::CertStatusRequest {});

    println!(
        "seeds: wrote {} inputs ({} bytes) under {}, and fixtures/key.json and fixtures/config",
        c.written,
        c.bytes,
        out.join("corpus").display()
    );
}

// Built by cargo fuzz like the targets, with coverage instrumentation: its
// callbacks live in libFuzzer, which is linked for them. The test-input hook
// that libFuzzer's driver would call is never called here.
use libfuzzer_sys as _;

#[unsafe(no_mangle)]
#[allow(improper_ctypes_definitions)] // declared so by libfuzzer-sys; never crosses C
pub extern "C" fn rust_fuzzer_test_input(_bytes: &[u8]) -> i32 {
    0
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&out));
}
