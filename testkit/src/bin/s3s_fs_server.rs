//! `s3s-fs-server --host 127.0.0.1 --port PORT --access-key AK --secret-key SK ROOT`:
//! the S3 implementation of the `s3s-fs` crate (objects are files under
//! `ROOT/BUCKET/`, every request's signature is checked) served over HTTP as
//! its own `s3s-fs` binary does, with two differences that keep the test
//! server from taking what a real S3 service does not take from its clients:
//!
//! - `TCP_NODELAY` on every connection: without it a response's last small
//!   segment waited for the client's delayed ACK, 40 ms on Linux, on about
//!   every small object read.
//! - An object's content is sent from its file in 1 MiB reads on one thread:
//!   s3s-fs reads 4 KiB at a time, each through tokio's blocking pool, which
//!   cost a core-second of thread switches for every 450 MB read, on the same
//!   cores as the client measured. Status, headers and the signature check
//!   are s3s-fs's own; only the bytes of a successful GET come from here.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::StreamBody;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};

const PIECE: u64 = 1 << 20;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn usage() -> ! {
    eprintln!("usage: s3s-fs-server --host 127.0.0.1 --port PORT --access-key AK --secret-key SK ROOT");
    std::process::exit(2)
}

/// The file of the object a path-style GET names (`/BUCKET/KEY`), as
/// s3s-fs keeps it; `None` for anything else (a listing, a bucket, a path
/// that leaves the root).
fn object_file(root: &Path, req: &Request<Incoming>) -> Option<PathBuf> {
    if req.method() != Method::GET || req.uri().query().is_some() {
        return None;
    }
    let decoded = percent_decode(req.uri().path().strip_prefix('/')?)?;
    // Plain segments only: s3s-fs would read `a//b` or `a/./b` elsewhere.
    let segments: Vec<&str> = decoded.split('/').collect();
    if segments.len() < 2 || segments.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return None;
    }
    Some(root.join(decoded))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The byte range a successful GET's response carries, and the size of the
/// object it is from: from its `Content-Range` (206) or the whole
/// `Content-Length` (200).
fn body_range(resp: &hyper::Response<s3s::Body>) -> Option<(u64, u64, u64)> {
    let len: u64 = resp
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    match resp.status() {
        StatusCode::OK => Some((0, len, len)),
        StatusCode::PARTIAL_CONTENT => {
            let range = resp.headers().get(header::CONTENT_RANGE)?.to_str().ok()?;
            let (span, total) = range.strip_prefix("bytes ")?.split_once('/')?;
            let start: u64 = span.split('-').next()?.parse().ok()?;
            Some((start, len, total.parse().ok()?))
        }
        _ => None,
    }
}

/// `len` bytes of `file` from `start`, read a piece at a time on a thread
/// of their own.
fn file_body(file: std::fs::File, start: u64, len: u64) -> s3s::Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Frame<Bytes>>>(4);
    std::thread::spawn(move || {
        let mut at = start;
        while at < start + len {
            let n = PIECE.min(start + len - at);
            let mut buf = vec![0u8; n as usize];
            let piece = file
                .read_exact_at(&mut buf, at)
                .map(|()| Frame::data(Bytes::from(buf)));
            let failed = piece.is_err();
            if tx.blocking_send(piece).is_err() || failed {
                return;
            }
            at += n;
        }
    });
    s3s::Body::http_body(StreamBody::new(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })))
}

async fn serve(
    s3: S3Service,
    root: Arc<PathBuf>,
    req: Request<Incoming>,
) -> Result<hyper::Response<s3s::Body>, s3s::HttpError> {
    // Opened first: an object replaced while s3s-fs answers (a new file
    // renamed over it) is then seen as another file, and left to s3s-fs.
    let file = object_file(&root, &req).and_then(|p| Some((std::fs::File::open(&p).ok()?, p)));
    let mut resp = s3.call(req.map(s3s::Body::from)).await?;
    if let (Some((f, path)), Some((start, len, total))) = (file, body_range(&resp))
        && let (Ok(opened), Ok(now)) = (f.metadata(), std::fs::metadata(&path))
        && (opened.dev(), opened.ino()) == (now.dev(), now.ino())
        && opened.len() == total
        && start + len <= total
    {
        *resp.body_mut() = file_body(f, start, len);
    }
    Ok(resp)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(host), Some(port), Some(ak), Some(sk)) = (
        arg(&args, "--host"),
        arg(&args, "--port").and_then(|p| p.parse::<u16>().ok()),
        arg(&args, "--access-key"),
        arg(&args, "--secret-key"),
    ) else {
        usage()
    };
    let Some(root) = args.last().filter(|_| args.len() == 10).map(PathBuf::from) else {
        usage()
    };
    let root = match std::path::absolute(&root) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("error: failed to resolve {}: {e}", root.display());
            std::process::exit(1);
        }
    };
    let fs = match s3s_fs::FileSystem::new(&*root) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("error: failed to serve {}: {e:?}", root.display());
            std::process::exit(1);
        }
    };
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ak, sk));
    let s3 = builder.build();
    let listener = match tokio::net::TcpListener::bind((host.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: failed to listen on {host}:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("s3s-fs serving {} on {host}:{port}", root.display());
    let http = Builder::new(TokioExecutor::new());
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (s3, root) = (s3.clone(), Arc::clone(&root));
        let service = hyper::service::service_fn(move |req| serve(s3.clone(), Arc::clone(&root), req));
        let conn = http.serve_connection(TokioIo::new(socket), service).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
