//! What the server decodes from the network: the protobuf requests of the
//! Enrollment, Agent and Management services, and the checks it applies to
//! them before touching any state (chunk ids, uploaded chunks and trees,
//! the snapshot an agent sends, paths and patterns, client names, CSRs).

use std::fmt::Debug;
use std::path::{Component, Path};
use std::sync::OnceLock;

use backer_proto::ca::{self, Ca, Identity, identity_of};
use backer_proto::pki::requested_client;
use backer_proto::v1 as pb;
use backer_repo::archiver::Excluder;
use backer_repo::chunk::{self, blob_id};
use backer_repo::pack::BlobType;
use backer_repo::repository::{Kind, open_object, seal_object};
use backer_repo::snapshot::Snapshot;
use backer_repo::store::MAX_TREE;
use backer_repo::tree::Tree;
use backer_server::config::valid_client_name;
use backer_server::datapath::{self, MAX_IDS, check_upload};
use backer_server::runner::clean_paths;
use prost::Message;

use crate::storage::compress;
use crate::{der_of, key, pem};

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::create("fuzz").unwrap())
}

/// A valid CSR (PEM), to sign for client names the fuzzer makes up.
fn valid_csr() -> &'static str {
    static CSR: OnceLock<String> = OnceLock::new();
    CSR.get_or_init(|| backer_proto::pki::new_csr().unwrap().1)
}

/// Decodes one message; when it decodes, encoding it gives bytes that
/// decode to the same message.
fn decode<M: Message + Default + PartialEq + Debug>(body: &[u8]) -> Option<M> {
    let m = M::decode(body).ok()?;
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len());
    assert_eq!(M::decode(bytes.as_slice()).unwrap(), m);
    Some(m)
}

/// The messages each service receives, in the order of a seed's first byte.
pub const AGENT_REQUESTS: [&str; 10] = [
    "enroll",
    "renew",
    "agent_report",
    "chunk_keys",
    "missing",
    "upload_batch",
    "read_tree",
    "finish_backup",
    "read_chunks",
    "request_job",
];
pub const MANAGEMENT_REQUESTS: [&str; 10] = [
    "list_clients",
    "add_client",
    "remove_client",
    "start_backup",
    "start_restore",
    "list_jobs",
    "watch_job",
    "list_snapshots",
    "list_files",
    "cert_status",
];

/// A request to the Enrollment or Agent service: `[which][message]`.
pub fn agent_requests(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match usize::from(which) % AGENT_REQUESTS.len() {
        0 => {
            if let Some(m) = decode::<pb::EnrollRequest>(body) {
                csr_pem(&m.csr_pem);
            }
        }
        1 => {
            if let Some(m) = decode::<pb::RenewRequest>(body) {
                csr_pem(&m.csr_pem);
            }
        }
        2 => {
            decode::<pb::AgentReport>(body);
        }
        3 => {
            decode::<pb::ChunkKeysRequest>(body);
        }
        4 => {
            if let Some(m) = decode::<pb::MissingRequest>(body) {
                ids(&m.ids);
            }
        }
        5 => {
            if let Some(m) = decode::<pb::UploadBatch>(body) {
                for c in &m.chunks {
                    upload(c);
                }
            }
        }
        6 => {
            if let Some(m) = decode::<pb::ReadTreeRequest>(body) {
                ids(std::slice::from_ref(&m.id));
            }
        }
        7 => {
            if let Some(m) = decode::<pb::FinishBackupRequest>(body) {
                snapshot_json(m.snapshot_json.as_bytes());
            }
        }
        8 => {
            if let Some(m) = decode::<pb::ReadChunksRequest>(body) {
                ids(&m.ids);
            }
        }
        _ => match decode::<pb::RequestJobRequest>(body).and_then(|m| m.job) {
            Some(pb::request_job_request::Job::Backup(b)) => start_backup(&b),
            Some(pb::request_job_request::Job::Restore(r)) => start_restore(&r),
            None => {}
        },
    }
}

/// A request to the Management service: `[which][message]`.
pub fn management_requests(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match usize::from(which) % MANAGEMENT_REQUESTS.len() {
        0 => {
            decode::<pb::ListClientsRequest>(body);
        }
        1 => {
            if let Some(m) = decode::<pb::AddClientRequest>(body) {
                client_name(&m.name);
            }
        }
        2 => {
            decode::<pb::RemoveClientRequest>(body);
        }
        3 => {
            if let Some(m) = decode::<pb::StartBackupRequest>(body) {
                start_backup(&m);
            }
        }
        4 => {
            if let Some(m) = decode::<pb::StartRestoreRequest>(body) {
                start_restore(&m);
            }
        }
        5 => {
            decode::<pb::ListJobsRequest>(body);
        }
        6 => {
            decode::<pb::WatchJobRequest>(body);
        }
        7 => {
            decode::<pb::ListSnapshotsRequest>(body);
        }
        8 => {
            decode::<pb::ListFilesRequest>(body);
        }
        _ => {
            decode::<pb::CertStatusRequest>(body);
        }
    }
}

/// Chunk ids of Missing, ReadTree and ReadChunks: 32 bytes or refused.
fn ids(ids: &[prost::bytes::Bytes]) {
    if ids.len() > MAX_IDS {
        return;
    }
    for id in ids {
        assert_eq!(datapath::blob_id(id).is_ok(), id.len() == 32);
    }
}

/// What the server checks of a backup request before it looks anything up.
fn start_backup(b: &pb::StartBackupRequest) {
    if !matches!(b.root.as_str(), "" | "/") {
        paths(std::slice::from_ref(&b.root));
    }
    paths(&b.paths);
    for e in &b.excludes {
        let _ = Excluder::new(std::slice::from_ref(e));
    }
}

/// What the server checks of a restore request before it looks anything up.
fn start_restore(r: &pb::StartRestoreRequest) {
    paths(std::slice::from_ref(&r.target));
    for inc in &r.includes {
        paths(std::slice::from_ref(inc));
    }
}

/// `clean_paths`: what it accepts comes out absolute, `..`-free, sorted,
/// without duplicates, and cleaning it again changes nothing.
fn paths(given: &[String]) {
    let has_parent = |p: &str| Path::new(p).components().any(|c| c == Component::ParentDir);
    match clean_paths(given, "path") {
        Ok(out) => {
            assert!(out.len() <= given.len());
            assert!(out.windows(2).all(|w| w[0] < w[1]), "{out:?}");
            for p in &out {
                assert!(p.starts_with('/') && !has_parent(p), "{p:?}");
            }
            assert_eq!(clean_paths(&out, "path").unwrap(), out);
        }
        Err(_) => assert!(given.iter().any(|p| !p.starts_with('/') || has_parent(p))),
    }
}

/// AddClient: a name the server accepts is a DNS name whose certificate
/// names exactly that client.
fn client_name(name: &str) {
    if !valid_client_name(name) {
        return;
    }
    assert!(
        name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    );
    let issued = ca().sign_client(name, valid_csr()).unwrap();
    let (who, _, _) = identity_of(&der_of(&issued.cert_pem).unwrap()).unwrap();
    assert_eq!(who, Identity::Client(name.to_string()));
}

/// One chunk of an UploadBatch: if the server accepts it, it is what it
/// claims to be.
fn upload(m: &pb::UploadChunk) {
    let Ok((id, kind)) = check_upload(&key().chunk, m) else {
        return;
    };
    let raw = chunk::decompress(&m.payload, m.raw_len as usize).unwrap();
    assert_eq!(blob_id(&key().chunk, &raw), id);
    match kind {
        BlobType::Data => assert!(m.kind == 0 && raw.len() <= chunk::MAX_CHUNK),
        BlobType::Tree => {
            assert!(m.kind == 1 && raw.len() <= MAX_TREE);
            Tree::from_bytes(&raw, "accepted tree").unwrap();
        }
    }
}

/// An uploaded chunk, as `datapath::check_upload` checks it. The first
/// byte picks an honest agent (`[0 | kind << 1][raw bytes]`: compressed and
/// named here, so it must be accepted exactly when it is data or a tree
/// that decodes) or anything (`[1 | honest id << 1][kind][raw_len: u32 LE]
/// [id: 32][payload]`, the id replaced by the right one when asked, so the
/// tree decoder behind the hash check is reached too).
pub fn upload_chunk(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = &key().chunk;
    if mode % 2 == 0 {
        let kind = u32::from(mode >> 1) % 2;
        let m = pb::UploadChunk {
            id: blob_id(keys, rest).0.to_vec().into(),
            kind,
            payload: compress(rest).into(),
            raw_len: rest.len() as u32,
        };
        let r = check_upload(keys, &m);
        // A tree must be exactly a tree's encoding: nothing after it.
        let valid =
            kind == 0 || Tree::from_bytes(rest, "tree").is_ok_and(|t| t.to_bytes().is_ok_and(|b| b == rest));
        assert_eq!(r.is_ok(), valid, "{r:?}");
        upload(&m);
        return;
    }
    let Some((head, rest)) = rest.split_first_chunk::<5>() else {
        return;
    };
    let raw_len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    let (id, payload) = rest.split_at(rest.len().min(32));
    let mut m = pb::UploadChunk {
        id: id.to_vec().into(),
        kind: u32::from(head[0]),
        payload: payload.to_vec().into(),
        raw_len,
    };
    if (mode >> 1) % 2 == 1 && raw_len as usize <= MAX_TREE {
        if let Ok(raw) = chunk::decompress(payload, raw_len as usize) {
            m.id = blob_id(keys, &raw).0.to_vec().into();
        }
    }
    upload(&m);
}

/// FinishBackup's snapshot, as the agent writes it (JSON); the server then
/// stores it sealed and reads it back.
pub fn snapshot_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(snap) = serde_json::from_str::<Snapshot>(text) else {
        return;
    };
    let json = serde_json::to_string(&snap).unwrap();
    let mut back: Snapshot = serde_json::from_str(&json).unwrap();
    // serde_json parses a float to within an ulp, not always exactly (its
    // `float_roundtrip` feature is off), so the duration may move that much.
    let (a, b) = (back.summary.duration_secs, snap.summary.duration_secs);
    assert!(
        a == b || (a - b).abs() <= f64::EPSILON * a.abs().max(b.abs()),
        "{a} vs {b}"
    );
    back.summary.duration_secs = b;
    assert_eq!(back, snap);
    let (path, bytes) = seal_object(key(), Kind::Snapshot, &snap).unwrap();
    let stored: Snapshot =
        open_object(key(), Kind::Snapshot, path.split_once('/').unwrap().1, &bytes).unwrap();
    assert_eq!(
        postcard::to_stdvec(&stored).unwrap(),
        postcard::to_stdvec(&snap).unwrap()
    );
}

/// The CSR of Enroll and Renew, and a peer's certificate. The first byte
/// picks PEM text, DER wrapped in PEM here (so the fuzzer works on the DER,
/// not on base64), or DER of a certificate, as TLS hands it to `identity_of`.
pub fn csr(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(body) {
                csr_pem(text);
            }
        }
        1 => csr_pem(&pem("CERTIFICATE REQUEST", body)),
        _ => {
            let _ = identity_of(body);
            let _ = ca::describe(&pem("CERTIFICATE", body));
        }
    }
}

/// A CSR the server signs yields a certificate naming the client the server
/// chose, whatever the CSR asked for; one `requested_client` can read, the
/// CA can sign.
fn csr_pem(text: &str) {
    let asked = requested_client(text);
    match ca().sign_client("fuzz-client", text) {
        Ok(issued) => {
            let der = der_of(&issued.cert_pem).unwrap();
            let (who, serial, not_after) = identity_of(&der).unwrap();
            assert_eq!(who, Identity::Client("fuzz-client".into()));
            assert_eq!((serial, not_after), (issued.serial, issued.not_after));
            let (names, _) = ca::describe(&issued.cert_pem).unwrap();
            assert_eq!(names, vec!["fuzz-client.client.backer".to_string()]);
        }
        Err(e) => assert!(
            asked.is_none(),
            "requested_client read {asked:?} from a CSR the CA refused: {e}"
        ),
    }
}
