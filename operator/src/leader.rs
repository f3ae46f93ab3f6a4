//! Leader election on a coordination.k8s.io Lease: only the holder
//! reconciles. The holder renews every few seconds; a replica that cannot
//! renew in time stops (and is restarted by its Deployment) rather than
//! risk two operators starting the same backup. A holder that is asked to
//! stop gives the lease up, so a waiting replica takes over at its next
//! look instead of after the lease's duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
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
/// How often a waiting replica looks at the lease.
const WAIT: Duration = Duration::from_secs(2);

/// Where this replica stands, for `/readyz`: both a waiting replica and a
/// leading one that has started are able to serve (a Deployment with two
/// replicas is only Available when both are ready).
#[derive(Debug)]
pub struct Role(AtomicU8);

impl Default for Role {
    fn default() -> Role {
        Role(AtomicU8::new(Role::STARTING))
    }
}

impl Role {
    const STARTING: u8 = 0;
    const STANDBY: u8 = 1;
    const ACQUIRED: u8 = 2;
    const LEADING: u8 = 3;

    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Leading, with the PKI in place and the controllers started.
    pub fn set_leading(&self) {
        self.set(Role::LEADING);
    }

    /// `Ok(what)` when this replica can serve, else `Err(why not)`.
    pub fn readiness(&self) -> Result<&'static str, &'static str> {
        match self.0.load(Ordering::Relaxed) {
            Role::STANDBY => Ok("ready: standby (another replica leads; this one takes over if it goes)"),
            Role::LEADING => Ok("ready: leading"),
            Role::ACQUIRED => Err("leading, but the PKI is not in place yet"),
            _ => Err("starting: the lease has not been read yet"),
        }
    }
}

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

/// The lease while this replica holds it: renewed in the background until
/// [`Leadership::release`].
#[derive(Debug)]
pub struct Leadership {
    api: Api<Lease>,
    identity: String,
    /// Ends, with why, when the lease is lost: the caller stops leading.
    renewing: tokio::task::JoinHandle<String>,
}

impl Leadership {
    /// Resolves when the lease is lost (another replica took it, or it
    /// could not be renewed in time), saying why. The caller must stop
    /// reconciling at once: another replica may lead already.
    pub async fn lost(&mut self) -> String {
        match (&mut self.renewing).await {
            Ok(why) => why,
            Err(e) => format!("the lease renewal task failed: {e}"),
        }
    }

    /// Stops renewing and gives the lease up (holder cleared), so a waiting
    /// replica takes over at its next look. A failure is logged: the lease
    /// then simply expires.
    pub async fn release(self) {
        self.renewing.abort();
        let result = async {
            let Some(mut lease) = self.api.get_opt(LEASE).await? else {
                return Ok::<_, kube::Error>(false);
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            // The read version: a replica that took over meanwhile keeps it.
            self.api.replace(LEASE, &PostParams::default(), &lease).await?;
            Ok(true)
        };
        match tokio::time::timeout(RENEW, result).await {
            Ok(Ok(true)) => tracing::info!(lease = LEASE, "gave the lease up"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(
                lease = LEASE,
                "failed to give the lease up, it expires instead: {e}"
            ),
            Err(_) => tracing::warn!(
                lease = LEASE,
                "failed to give the lease up in time, it expires instead"
            ),
        }
    }
}

/// Waits until this replica leads, then keeps renewing in the background.
/// Losing the lease ends [`Leadership::lost`]. `role` says standby once the lease
/// was read and another replica holds it.
pub async fn lead(
    client: Client,
    ns: &str,
    identity: String,
    metrics: Arc<Metrics>,
    role: Arc<Role>,
) -> Result<Leadership, Error> {
    let api: Api<Lease> = Api::namespaced(client, ns);
    let mut logged = false;
    let mut seen = Seen::default();
    loop {
        if try_hold(&api, &identity, &mut seen).await? {
            break;
        }
        role.set(Role::STANDBY);
        if !logged {
            tracing::info!(lease = LEASE, "another replica leads; waiting");
            logged = true;
        }
        tokio::time::sleep(WAIT).await;
    }
    role.set(Role::ACQUIRED);
    tracing::info!(lease = LEASE, %identity, "leading");
    metrics.leader.set(1);
    let (renew_api, renew_identity) = (api.clone(), identity.clone());
    let renewing = tokio::spawn(async move {
        let (api, identity) = (renew_api, renew_identity);
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW).await;
            // A renewal that hangs is a renewal that failed: bounded, so the
            // check below runs even when the API server stops answering.
            let attempt = tokio::time::timeout(RENEW, try_hold(&api, &identity, &mut seen)).await;
            match attempt.unwrap_or_else(|_| Err(Error::Server("the lease renewal timed out".into()))) {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => return "lost the lease to another replica".to_string(),
                Err(e) => {
                    tracing::warn!(lease = LEASE, "failed to renew the lease: {e}");
                    if last_ok.elapsed() > Duration::from_secs(DURATION_SECS as u64 - 3) {
                        return "could not renew the lease in time".to_string();
                    }
                }
            }
        }
    });
    Ok(Leadership {
        api,
        identity,
        renewing,
    })
}
