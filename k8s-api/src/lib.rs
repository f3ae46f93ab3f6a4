//! Backer's Kubernetes API: the custom resources, group `backer.dev`,
//! version `v1alpha1`, in a crate of their own so the kubectl plugin uses
//! them without linking the operator. The YAML in `crds/` is generated from
//! these types ([`crds_yaml`], `backer-operator crdgen`); CI fails when the
//! committed copy differs.
//!
//! Rules the API server can check itself are CEL rules here, so a bad object
//! is refused at `kubectl apply` with a message that says what to fix. What
//! needs the cluster's state (does the PVC exist, is this namespace allowed to
//! name clients) is checked by the reconcilers and reported as a condition.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "backer.dev";

/// Absolute, and no `..` component: paths name places on a client or inside a volume.
const PATH_RULE: &str = "self.all(p, p.startsWith('/') && !p.matches('(^|/)[.][.](/|$)'))";
const PATH_MESSAGE: &str = "paths must be absolute (start with /) and must not contain `..`";

/// One host that backs up: a node of this cluster or an external host.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "backer.dev",
    version = "v1alpha1",
    kind = "BackerClient",
    status = "BackerClientStatus",
    shortname = "bc",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Connected","type":"boolean","jsonPath":".status.connected"}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".status.agentVersion"}"#,
    printcolumn = r#"{"name":"Last Backup","type":"date","jsonPath":".status.lastBackup"}"#,
    printcolumn = r#"{"name":"Cert Expiry","type":"date","jsonPath":".status.certificateExpiry"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackerClientSpec {
    /// The node this client is (its agent proves it runs there). Empty for a
    /// host outside the cluster, which enrols with the token the operator
    /// writes into the Secret `backer-enrol-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("nodeName cannot change: delete the client and create another"))]
    pub node_name: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackerClientStatus {
    /// `Pending` (no certificate yet), `Enrolled`, or `Revoked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default)]
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expiry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// What to back up, where from, and when.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "backer.dev",
    version = "v1alpha1",
    kind = "BackupJob",
    namespaced,
    status = "BackupJobStatus",
    shortname = "bj",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.pvc"}"#,
    printcolumn = r#"{"name":"Last Run","type":"date","jsonPath":".status.lastRun.started"}"#,
    printcolumn = r#"{"name":"Next Run","type":"date","jsonPath":".status.nextRun"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("(has(self.spec.pvc) ? 1 : 0) + ((has(self.spec.clients) && size(self.spec.clients) > 0) || has(self.spec.clientSelector) ? 1 : 0) == 1").message("set exactly one source: pvc, or clients / clientSelector"),
    validation = kube::core::Rule::new("has(self.spec.pvc) || (has(self.spec.paths) && size(self.spec.paths) > 0)").message("name at least one path to back up on the clients (spec.paths)"),
    validation = kube::core::Rule::new("!has(self.spec.timeZone) || has(self.spec.schedule)").message("timeZone needs a schedule")
)]
#[serde(rename_all = "camelCase")]
pub struct BackupJobSpec {
    /// Clients by name. Only in the operator's namespace: naming hosts is an
    /// administrator's act.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 253)))]
    pub clients: Vec<String>,
    /// Clients by label (operator's namespace only, as `clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_selector: Option<LabelSelector>,
    /// A PersistentVolumeClaim in this namespace, read where a pod mounts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    /// Absolute paths on the clients, or inside the volume (default `/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATH_RULE).message(PATH_MESSAGE))]
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    pub paths: Vec<String>,
    /// Glob patterns to leave out (`*.tmp`, `/cache/**`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new("self.all(e, size(e) > 0)").message("exclude patterns must not be empty"))]
    #[schemars(length(max = 64), inner(length(max = 256)))]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new("self.all(t, !t.contains('='))").message("tags must not contain `=`: the operator's own tags use it"))]
    #[schemars(length(max = 16), inner(length(max = 128)))]
    pub tags: Vec<String>,
    /// Forget older snapshots of this job after each successful run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Cron schedule (minute hour day-of-month month day-of-week, or
    /// `@daily` and friends). Without one the job runs once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new(r"self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[0-9A-Za-z*/,?-]+( +[0-9A-Za-z*/,?-]+){4})$')").message("schedule must be a cron expression of five fields (minute hour day-of-month month day-of-week), e.g. \"0 3 * * *\", or one of @hourly @daily @weekly @monthly @yearly"))]
    #[schemars(length(max = 128))]
    pub schedule: Option<String>,
    /// IANA time zone of the schedule (default UTC), e.g. `Europe/Berlin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,
    /// Stop scheduling new runs; a running one finishes.
    #[serde(default)]
    pub suspend: bool,
    /// What to do when a run is due while the previous one still runs.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// How many finished runs the status keeps.
    #[serde(default = "default_history")]
    #[schemars(range(min = 1, max = 100))]
    pub history_limit: u32,
}

fn default_history() -> u32 {
    5
}

#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub enum ConcurrencyPolicy {
    /// Skip a run that comes due while another runs.
    #[default]
    Forbid,
    /// Start it anyway.
    Allow,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.keepLast + self.keepHourly + self.keepDaily + self.keepWeekly + self.keepMonthly + self.keepYearly > 0").message("a retention policy must keep something: set at least one keep* above 0"))]
pub struct Retention {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupJobStatus {
    /// `Pending`, `Running`, `Succeeded`, `Partial`, `Failed`, `Scheduled`
    /// (waiting for its next run) or `Invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Run>,
    /// Earlier runs, newest first, at most `historyLimit` with `lastRun`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Run>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
    /// When the schedule last fired (a run started or was skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One run of a BackupJob or RestoreJob: a job on the server per client.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// `Running`, `Succeeded`, `Partial` or `Failed`.
    pub phase: String,
    #[serde(default)]
    pub files: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub files_total: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// Bytes per second so far.
    #[serde(default)]
    pub rate: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<ServerJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Run {
    /// One line for people: `succeeded: 12 files, 3456 bytes`, with the
    /// reason when it did not.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} files, {} bytes{}",
            self.phase.to_lowercase(),
            self.files,
            self.bytes,
            self.message
                .as_ref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        )
    }
}

/// A job of the server's, for one client.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerJob {
    pub id: String,
    pub client: String,
    /// As the server says: `queued`, `running`, `succeeded`, `partial`, `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
}

/// Files back from a Snapshot, into a directory of a client or into a PVC.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "backer.dev",
    version = "v1alpha1",
    kind = "RestoreJob",
    namespaced,
    status = "RestoreJobStatus",
    shortname = "rj",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshot"}"#,
    printcolumn = r#"{"name":"Files","type":"integer","jsonPath":".status.run.files"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("a RestoreJob cannot change once created: create another")
)]
#[serde(rename_all = "camelCase")]
pub struct RestoreJobSpec {
    /// The name of a Snapshot in this namespace.
    #[x_kube(validation = kube::core::Rule::new("size(self) > 0").message("name the Snapshot to restore"))]
    #[schemars(length(max = 253))]
    pub snapshot: String,
    /// Only these paths inside the snapshot (files or directories); all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATH_RULE).message(PATH_MESSAGE))]
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    pub paths: Vec<String>,
    pub target: RestoreTarget,
    /// `Never` refuses to replace a file that exists; `Always` replaces it.
    #[serde(default)]
    pub overwrite: OverwritePolicy,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.pvc) != has(self.client)").message("target: set exactly one of pvc or client"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.client) || has(self.path)").message("target.path is required with target.client: the directory to restore into"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.subPath) || has(self.pvc)").message("target.subPath goes with target.pvc; use target.path with a client"))]
pub struct RestoreTarget {
    /// A client (operator's namespace only), with `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Absolute directory on the client to restore into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')").message("target.path must be absolute and must not contain `..`"))]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
    /// A PersistentVolumeClaim in this namespace, mounted by a running pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    /// A directory inside the volume (default: its root, in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)') && size(self) > 0").message("target.subPath must be relative to the volume and must not contain `..`"))]
    #[schemars(length(max = 1024))]
    pub sub_path: Option<String>,
}

#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub enum OverwritePolicy {
    #[default]
    Never,
    Always,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreJobStatus {
    /// `Pending`, `Running`, `Succeeded`, `Partial`, `Failed` or `Invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Run>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A snapshot in the repository, mirrored by the operator (read-only): in
/// the PVC's namespace for a volume, in the BackupJob's for node paths.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "backer.dev",
    version = "v1alpha1",
    kind = "Snapshot",
    namespaced,
    shortname = "snap",
    printcolumn = r#"{"name":"Client","type":"string","jsonPath":".spec.client"}"#,
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.pvc"}"#,
    printcolumn = r#"{"name":"Time","type":"date","jsonPath":".spec.time"}"#,
    printcolumn = r#"{"name":"Files","type":"integer","jsonPath":".spec.files"}"#,
    printcolumn = r#"{"name":"Bytes","type":"integer","jsonPath":".spec.bytes"}"#,
    printcolumn = r#"{"name":"Id","type":"string","jsonPath":".spec.id","priority":1}"#,
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("a Snapshot mirrors the repository and cannot be changed")
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// The repository's snapshot id.
    pub id: String,
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_job: Option<String>,
    pub time: String,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub files: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub partial: bool,
}

/// A request to list the files of a Snapshot of this namespace: the
/// operator answers in `status` (at most [`MAX_LISTED`] entries) and deletes
/// the object some minutes later. `kubectl backer ls` makes one, reads it
/// and deletes it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "backer.dev",
    version = "v1alpha1",
    kind = "SnapshotListing",
    namespaced,
    status = "SnapshotListingStatus",
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.snapshot"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.path"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Entries","type":"integer","jsonPath":".status.count"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("a SnapshotListing cannot change once created: create another")
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotListingSpec {
    /// The name of a Snapshot in this namespace.
    #[x_kube(validation = kube::core::Rule::new("size(self) > 0").message("name the Snapshot to list"))]
    #[schemars(length(max = 253))]
    pub snapshot: String,
    /// A directory or file inside the snapshot (default: all of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')").message("path must be absolute and must not contain `..`"))]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
}

/// The most entries one SnapshotListing holds (an object must stay well
/// under etcd's size limit); `truncated` says when there were more.
pub const MAX_LISTED: usize = 1000;

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotListingStatus {
    /// `Ready` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Why it failed, or what to do when it was truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<ListedEntry>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ListedEntry {
    pub path: String,
    /// `file`, `dir`, `symlink`, ...
    pub kind: String,
    pub mode: u32,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
}

/// Every CRD as one YAML stream, as `crds/` and the chart hold it.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out =
        String::from("# Generated by `backer-operator crdgen`: edit k8s-api/src/lib.rs, not this file.\n");
    for crd in [
        BackerClient::crd(),
        BackupJob::crd(),
        RestoreJob::crd(),
        Snapshot::crd(),
        SnapshotListing::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
