//! `s3s-fs-server --host 127.0.0.1 --port PORT --access-key AK --secret-key SK ROOT`:
//! the S3 implementation of the `s3s-fs` crate (objects are files under
//! `ROOT/BUCKET/`, every request's signature is checked) served over HTTP,
//! as its own `s3s-fs` binary does, but with `TCP_NODELAY` on every
//! connection: without it a response's last small segment waited for the
//! client's delayed ACK, 40 ms on Linux, on about every small object read —
//! a delay no S3 service adds, which made the suite and the bench measure
//! the test server instead of the client.

use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

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
    let fs = match s3s_fs::FileSystem::new(&root) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("error: failed to serve {}: {e:?}", root.display());
            std::process::exit(1);
        }
    };
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ak, sk));
    let service = builder.build();
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
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
