//! Leader election on a coordination.k8s.io Lease: only the holder
//! reconciles. The holder renews every few seconds; a replica that cannot
//! renew in time stops (and is restarted by its Deployment) rather than
//! risk two operators starting the same backup.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::error::Error;
use crate::metrics::Metrics;

pub const LEASE: &str = "backer-operator";
const DURATION_SECS: i32 = 15;
const RENEW: Duration = Duration::from_secs(5);

/// What this replica last saw of another holder's lease, and when (by its
/// own clock: comparing with the holder's clock would let skew decide).
#[derive(Debug, Default)]
struct Seen {
    holder: Option<String>,
    renewed: Option<i64>,
    at: Option<std::time::Instant>,
}

impl Seen {
    /// True once the same renewal has been seen for longer than the lease lasts.
    fn expired(&mut self, lease: &Lease) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let renewed = spec.renew_time.as_ref().map(|t| t.0.as_second());
        let secs = spec.lease_duration_seconds.unwrap_or(DURATION_SECS).max(1) as u64;
        if self.holder != spec.holder_identity || self.renewed != renewed || self.at.is_none() {
            *self = Seen {
                holder: spec.holder_identity,
                renewed,
                at: Some(std::time::Instant::now()),
            };
            return false;
        }
        self.at.is_some_and(|at| at.elapsed() > Duration::from_secs(secs))
    }
}

fn ours(identity: &str, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.into()),
        lease_duration_seconds: Some(DURATION_SECS),
        acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// Tries once to take or keep the lease. True when we hold it.
async fn try_hold(api: &Api<Lease>, identity: &str, seen: &mut Seen) -> Result<bool, Error> {
    let now = Timestamp::now();
    match api.get_opt(LEASE).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE.into()),
                    ..Default::default()
                },
                spec: Some(ours(identity, now, None, 0)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.is_already_exists() => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.as_deref();
            let mine = holder == Some(identity);
            if !mine && holder.is_some() && !seen.expired(&lease) {
                return Ok(false);
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
            let acquired = if mine { spec.acquire_time.clone() } else { None };
            lease.spec = Some(ours(identity, now, acquired, transitions));
            // The read version makes a racing replica's write fail.
            match api.replace(LEASE, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.is_conflict() => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Waits until this replica leads, then keeps renewing in the background.
/// Losing the lease ends the process.
pub async fn lead(client: Client, ns: &str, identity: String, metrics: Arc<Metrics>) -> Result<(), Error> {
    let api: Api<Lease> = Api::namespaced(client, ns);
    let mut logged = false;
    let mut seen = Seen::default();
    loop {
        if try_hold(&api, &identity, &mut seen).await? {
            break;
        }
        if !logged {
            tracing::info!(lease = LEASE, "another replica leads; waiting");
            logged = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tracing::info!(lease = LEASE, %identity, "leading");
    metrics.leader.store(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW).await;
            // A renewal that hangs is a renewal that failed: bounded, so the
            // check below runs even when the API server stops answering.
            let attempt = tokio::time::timeout(RENEW, try_hold(&api, &identity, &mut seen)).await;
            match attempt.unwrap_or_else(|_| Err(Error::Server("the lease renewal timed out".into()))) {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = LEASE, "lost the lease to another replica: stopping");
                    std::process::exit(1);
                }
                Err(e) => {
                    tracing::warn!(lease = LEASE, "failed to renew the lease: {e}");
                    if last_ok.elapsed() > Duration::from_secs(DURATION_SECS as u64 - 3) {
                        tracing::error!(lease = LEASE, "could not renew the lease in time: stopping");
                        std::process::exit(1);
                    }
                }
            }
        }
    });
    Ok(())
}
