//! Where a PersistentVolumeClaim's files are: the node of a running pod that
//! mounts it, and the directory the kubelet mounted it at (as Velero's node
//! agent reads it).

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use crate::error::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub node: String,
    /// The volume's root on the node.
    pub dir: String,
    pub pod: String,
}

/// The volume's directory on the node, given the pod that mounts it.
pub fn volume_dir(kubelet_root: &str, pod_uid: &str, pv: &PersistentVolume) -> Result<String, String> {
    let pv_name = pv.name_any();
    let spec = pv
        .spec
        .as_ref()
        .ok_or_else(|| format!("PersistentVolume {pv_name} has no spec"))?;
    if spec.csi.is_some() {
        return Ok(format!(
            "{kubelet_root}/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv_name}/mount"
        ));
    }
    if let Some(h) = &spec.host_path {
        return Ok(h.path.clone());
    }
    if let Some(l) = &spec.local {
        return Ok(l.path.clone());
    }
    if spec.nfs.is_some() {
        return Ok(format!(
            "{kubelet_root}/pods/{pod_uid}/volumes/kubernetes.io~nfs/{pv_name}"
        ));
    }
    Err(format!(
        "PersistentVolume {pv_name} is of a kind Backer cannot read yet (supported: CSI, hostPath, local, NFS)"
    ))
}

/// Whether the agents may write into `dir`, a volume's directory on its
/// node, for a restore: the kubelet's pods directory always is writable to
/// them; a hostPath or local volume (local-path's) only below one of
/// `host_volume_dirs`, the directories the chart mounts writable into the
/// agents (`agent.volumeDirs`). An empty list means "not known here": the
/// agent decides, and refuses with its restore roots named.
pub fn restorable(dir: &str, kubelet_root: &str, host_volume_dirs: &[String]) -> Result<(), String> {
    let below = |root: &str| {
        let root = root.trim_end_matches('/');
        root.is_empty() || dir == root || dir.starts_with(&format!("{root}/"))
    };
    if host_volume_dirs.is_empty() || below(&format!("{kubelet_root}/pods")) {
        return Ok(());
    }
    if host_volume_dirs.iter().any(|d| below(d)) {
        return Ok(());
    }
    Err(format!(
        "the volume's directory {dir} is outside the directories the agents may restore into ({}): \
         add its parent directory to the chart's agent.volumeDirs",
        host_volume_dirs.join(", ")
    ))
}

pub async fn locate(client: &Client, ns: &str, claim: &str, kubelet_root: &str) -> Result<Located, Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc = pvcs
        .get_opt(claim)
        .await?
        .ok_or_else(|| Error::Invalid(format!("PersistentVolumeClaim {ns}/{claim} does not exist")))?;
    let pv_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "PersistentVolumeClaim {ns}/{claim} is not bound to a volume yet"
            ))
        })?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&pv_name)
        .await?
        .ok_or_else(|| {
            Error::Invalid(format!(
                "PersistentVolume {pv_name} of claim {ns}/{claim} does not exist"
            ))
        })?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods
        .list(&ListParams::default())
        .await?
        .into_iter()
        .find(|p| {
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let mounts = p.spec.as_ref().is_some_and(|s| {
                s.volumes.iter().flatten().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == claim)
                })
            });
            running && mounts
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no running pod mounts PersistentVolumeClaim {ns}/{claim}: Backer reads a volume where a pod has it mounted"
            ))
        })?;
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| Error::Invalid(format!("pod {} is not on a node", pod.name_any())))?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = volume_dir(kubelet_root, &uid, &pv).map_err(Error::Invalid)?;
    Ok(Located {
        node,
        dir,
        pod: pod.name_any(),
    })
}
