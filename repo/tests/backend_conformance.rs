//! One conformance suite that every storage backend passes: a local
//! directory, memory, and two real S3-compatible servers (moto, s3s-fs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use backer_repo::Backend;
use backer_repo::error::Error;
use backer_testkit::{LatencyProxy, Moto, S3sFs, s3_url};
use bytes::Bytes;

async fn conformance(b: &Backend) {
    // Create once, never replace.
    b.put_new("data/ab/one", Bytes::from_static(b"hello world"))
        .await
        .unwrap();
    let again = b.put_new("data/ab/one", Bytes::from_static(b"other")).await;
    assert!(matches!(again, Err(Error::AlreadyExists(_))), "{again:?}");
    assert_eq!(
        b.get("data/ab/one").await.unwrap(),
        Bytes::from_static(b"hello world")
    );

    // Missing objects are NotFound, not empty.
    assert!(matches!(b.get("data/ab/nope").await, Err(Error::NotFound(_))));
    assert_eq!(b.head("data/ab/nope").await.unwrap(), None);
    assert_eq!(b.head("data/ab/one").await.unwrap(), Some(11));

    // Ranges, and a range past the end is an error, not a short read.
    assert_eq!(
        b.get_range("data/ab/one", 6..11).await.unwrap(),
        Bytes::from_static(b"world")
    );
    assert!(b.get_range("data/ab/one", 6..40).await.is_err());

    // A large object survives whole.
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    b.put_new("data/cd/big", Bytes::from(big.clone())).await.unwrap();
    assert_eq!(b.get("data/cd/big").await.unwrap().as_ref(), big.as_slice());
    // One of a length that is not whole blocks (a local directory writes big
    // objects with O_DIRECT, padded, then cut), created once too.
    let odd: Vec<u8> = (0..(3 << 20) + 123u32).map(|i| (i % 241) as u8).collect();
    b.put_new("data/cd/odd", Bytes::from(odd.clone())).await.unwrap();
    let again = b
        .put_new("data/cd/odd", Bytes::from(big[..2 << 20].to_vec()))
        .await;
    assert!(matches!(again, Err(Error::AlreadyExists(_))), "{again:?}");
    assert_eq!(b.head("data/cd/odd").await.unwrap(), Some(odd.len() as u64));
    assert_eq!(b.get("data/cd/odd").await.unwrap().as_ref(), odd.as_slice());

    // A streamed range arrives whole and in order, in pieces; past the end
    // it is an error, not a short read.
    let (streamed, past_end) = {
        let (b, handle) = (b.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            b.stream_range_blocking(&handle, "data/cd/big", 1000..(9 << 20) + 7, &mut |p| {
                got.extend_from_slice(&p)
            })
            .unwrap();
            let past = b.stream_range_blocking(&handle, "data/cd/odd", 0..(4 << 20), &mut |_| {});
            (got, past)
        })
        .await
        .unwrap()
    };
    assert!(streamed == big[1000..(9 << 20) + 7], "the streamed range differs");
    assert!(past_end.is_err(), "{past_end:?}");

    // Listing is recursive, relative to the folder, and complete past one page
    // (S3 pages at 1,000 keys).
    for i in 0..1100 {
        b.put_new(&format!("index/{i:05}"), Bytes::from(vec![1u8; i % 7]))
            .await
            .unwrap();
    }
    let mut listed = b.list_all("index").await.unwrap();
    listed.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(listed.len(), 1100);
    assert_eq!(listed[3].name, "00003");
    assert_eq!(listed[3].size, 3);
    let data: Vec<String> = b
        .list_all("data")
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(
        data.contains(&"ab/one".to_string()) && data.contains(&"cd/big".to_string()),
        "{data:?}"
    );
    // Nothing half-written is listed (no temporary files).
    assert_eq!(data.len(), 3, "{data:?}");
    assert!(b.list_all("snapshots").await.unwrap().is_empty());

    // Delete, and deleting what is gone is fine.
    b.delete("data/ab/one").await.unwrap();
    assert_eq!(b.head("data/ab/one").await.unwrap(), None);
    b.delete("data/ab/one").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let mut b = Backend::open(root.to_str().unwrap()).unwrap();
    b.prepare_for_init().await.unwrap();
    conformance(&b).await;
    // Objects are plain files under the directory.
    assert!(root.join("data/cd/big").is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn memory() {
    conformance(&Backend::in_memory()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_on_moto() {
    let moto = Moto::start();
    moto.create_bucket("conformance");
    for (k, v) in Moto::env() {
        unsafe_env_set(k, v);
    }
    let b = Backend::open(&moto.url("conformance", "some/prefix")).unwrap();
    conformance(&b).await;
}

/// A second, real S3 implementation, through the latency proxy: what
/// passes here does not lean on one server's quirks, and ranged, streamed
/// reads cross a real HTTP hop.
#[tokio::test(flavor = "multi_thread")]
async fn s3_on_s3s_fs_behind_a_proxy() {
    let s3 = S3sFs::start();
    s3.create_bucket("conformance");
    let proxy = LatencyProxy::start(&s3.endpoint(), 1);
    for (k, v) in Moto::env() {
        unsafe_env_set(k, v);
    }
    let b = Backend::open(&s3_url(&proxy.endpoint(), "conformance", "some/prefix")).unwrap();
    conformance(&b).await;
    assert!(proxy.requests() > 0, "the calls went through the proxy");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_endpoint_down_is_a_clear_error() {
    for (k, v) in Moto::env() {
        unsafe_env_set(k, v);
    }
    let port = backer_testkit::free_port();
    let url = format!("s3://b/p?endpoint=http://127.0.0.1:{port}&path_style=true&retries=1");
    let b = Backend::open(&url).unwrap();
    let err = b.get("config").await.unwrap_err();
    let msg = format!("{err}");
    assert!(
        msg.contains("failed to access the storage backend at s3://b/p"),
        "{msg}"
    );
}

#[allow(unsafe_code)]
fn unsafe_env_set(k: &str, v: &str) {
    // set_var is unsafe because another thread may read the environment at the
    // same time; every test here sets the same values, so a racing reader sees
    // either nothing or the same credentials.
    unsafe { std::env::set_var(k, v) }
}
