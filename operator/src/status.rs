//! Status writing shared by the reconcilers: conditions that keep their
//! transition time while unchanged, and server-side apply of `.status` only
//! when it differs, so a reconciler's own write does not wake it forever.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn from_unix(secs: i64) -> Option<String> {
    (secs > 0)
        .then(|| DateTime::from_timestamp(secs, 0))
        .flatten()
        .map(rfc3339)
}

pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Sets condition `type_`, keeping its transition time when nothing changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if ok { "True" } else { "False" };
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status == status && c.reason == reason && c.message == message {
            c.observed_generation = generation;
            return;
        }
        *c = condition(type_, status, reason, message, generation);
        return;
    }
    conditions.push(condition(type_, status, reason, message, generation));
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Applies `status` to `obj` unless it already says the same.
pub async fn apply_status<K, S>(api: &Api<K>, obj: &K, old: Option<&S>, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if old == Some(status) {
        return Ok(());
    }
    let name = obj.meta().name.clone().unwrap_or_default();
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(crate::MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
