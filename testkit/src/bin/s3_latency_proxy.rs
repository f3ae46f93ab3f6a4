//! `s3-latency-proxy --upstream http://127.0.0.1:PORT [--delay-ms 20]
//! [--listen 127.0.0.1:0] [--log]`: forwards every HTTP request to the upstream S3
//! server after a fixed delay, as a network with that round trip would,
//! and counts them. Prints `listening on ADDR` once bound. `GET
//! /__proxy/stats` answers the counts as JSON (`{"requests":N,"GET":n,…}`,
//! and reads by repository folder: `"GET data":n`, `"GET index":n`, …)
//! without forwarding; `POST /__proxy/reset` sets them to zero. Headers go
//! through unchanged (a request's Host stays what the client signed).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;

type Body = BoxBody<Bytes, hyper::Error>;

struct Proxy {
    upstream: String,
    delay: Duration,
    counts: Mutex<BTreeMap<String, u64>>,
    /// GETs by the repository folder they read (`data`, `index`, …).
    reads: Mutex<BTreeMap<String, u64>>,
    /// `--log`: each request on stderr (method, path, range), to see what
    /// a command asks for.
    log: bool,
    client: Client<HttpConnector, Incoming>,
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

impl Proxy {
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path().to_string();
        if path == "/__proxy/stats" {
            let counts = self.counts.lock().clone();
            let total: u64 = counts.values().sum();
            let mut body = format!("{{\"requests\":{total}");
            for (method, n) in &counts {
                body.push_str(&format!(",\"{method}\":{n}"));
            }
            for (folder, n) in self.reads.lock().iter() {
                body.push_str(&format!(",\"GET {folder}\":{n}"));
            }
            body.push('}');
            return Ok(text(StatusCode::OK, body));
        }
        if path == "/__proxy/reset" {
            self.counts.lock().clear();
            self.reads.lock().clear();
            return Ok(text(StatusCode::OK, "{}".into()));
        }
        *self.counts.lock().entry(req.method().to_string()).or_default() += 1;
        if req.method() == hyper::Method::GET
            && let Some(folder) = ["data", "index", "snapshots", "keys", "locks"]
                .into_iter()
                .find(|f| path.contains(&format!("/{f}/")))
        {
            *self.reads.lock().entry(folder.to_string()).or_default() += 1;
        }
        if self.log {
            let range = req
                .headers()
                .get(hyper::header::RANGE)
                .and_then(|r| r.to_str().ok())
                .unwrap_or("");
            eprintln!("{} {} {range}", req.method(), req.uri());
        }
        tokio::time::sleep(self.delay).await;
        let (mut parts, body) = req.into_parts();
        let target = format!(
            "{}{}",
            self.upstream,
            parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        parts.uri = match target.parse() {
            Ok(u) => u,
            Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("bad uri: {e}"))),
        };
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => Ok(resp.map(|b| b.boxed())),
            Err(e) => Ok(text(StatusCode::BAD_GATEWAY, format!("upstream: {e}"))),
        }
    }
}

/// Small writes go out at once on both hops: with Nagle's algorithm a
/// response's last segment waits for the peer's delayed ACK (40 ms on
/// Linux), a delay no S3 service adds.
fn upstream_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(upstream) = arg(&args, "--upstream") else {
        eprintln!(
            "usage: s3-latency-proxy --upstream http://HOST:PORT [--delay-ms 20] [--listen 127.0.0.1:0] [--log]"
        );
        std::process::exit(2);
    };
    let delay = arg(&args, "--delay-ms")
        .and_then(|d| d.parse().ok())
        .unwrap_or(20);
    let listen: SocketAddr = match arg(&args, "--listen")
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: --listen: {e}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: failed to listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let proxy = Arc::new(Proxy {
        upstream: upstream.trim_end_matches('/').to_string(),
        delay: Duration::from_millis(delay),
        counts: Mutex::new(BTreeMap::new()),
        reads: Mutex::new(BTreeMap::new()),
        log: args.iter().any(|a| a == "--log"),
        client: Client::builder(TokioExecutor::new()).build(upstream_connector()),
    });
    match listener.local_addr() {
        Ok(a) => println!("listening on {a}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                async move { proxy.handle(req).await }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
