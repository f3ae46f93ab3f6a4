#!/usr/bin/env bash
# The same product on a real cluster where Docker exists (not on the
# development machine, which has no Docker engine): create a kind cluster,
# build and load the image, install the chart, then run a
# backup and a restore of a PVC through BackupJob and RestoreJob and check
# the bytes. The suite in operator/tests/e2e.rs proves the full behaviour
# against a real kube-apiserver without a kubelet; this checks the same
# objects with real kubelets, pods and volumes.
#
# Usage: e2e/kind.sh [--keep]    (needs docker, kind, kubectl)
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-backer-e2e}
keep=0; [[ "${1:-}" == --keep ]] && keep=1
for t in docker kind kubectl; do
  command -v "$t" >/dev/null || { echo "kind.sh: $t is required" >&2; exit 1; }
done
log() { printf '[kind] %s\n' "$*" >&2; }
cleanup() { (( keep )) || kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT

log "creating cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
for c in operator server agent; do
  log "building backer-$c:e2e"
  docker build -f images/Dockerfile --target "$c" -t "backer-$c:e2e" .
  kind load docker-image "backer-$c:e2e" --name "$CLUSTER"
done

helm="$(command -v helm || e2e/install-helm)"
kubectl create namespace backer-system --dry-run=client -o yaml | kubectl apply -f -
kubectl label --overwrite namespace backer-system pod-security.kubernetes.io/enforce=privileged
# kind's one node is its control plane (agent.controlPlane), and its
# local-path provisioner keeps volumes in /var/local-path-provisioner.
"$helm" upgrade --install backer charts/backer --namespace backer-system \
  --set image.tag=e2e --set agent.controlPlane=true \
  --set 'agent.volumeDirs={/var/local-path-provisioner}' --wait --timeout 5m
kubectl -n backer-system rollout status deploy/backer-operator --timeout=180s
kubectl -n backer-system rollout status deploy/backer-server --timeout=180s
kubectl -n backer-system rollout status ds/backer-agent --timeout=180s
node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
kubectl wait --for=jsonpath='{.status.phase}'=Enrolled "backerclient/$node" --timeout=180s

log "an app with a PVC and data in it"
kubectl create namespace apps --dry-run=client -o yaml | kubectl apply -f -
kubectl -n apps apply -f - <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: v1
kind: Pod
metadata: {name: app}
spec:
  containers:
    - name: app
      image: busybox
      command: [sh, -c, "head -c 5000000 /dev/urandom > /data/blob && sha256sum /data/blob > /data/blob.sum && sleep 3600"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
YAML
kubectl -n apps wait --for=condition=Ready pod/app --timeout=180s
sleep 3
kubectl -n apps apply -f - <<'YAML'
apiVersion: backer.dev/v1alpha1
kind: BackupJob
metadata: {name: data-once}
spec: {pvc: data}
YAML
kubectl -n apps wait --for=jsonpath='{.status.lastRun.phase}'=Succeeded backupjob/data-once --timeout=300s
snap=""
for _ in $(seq 60); do
  snap=$(kubectl -n apps get snapshots -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
  [[ -n "$snap" ]] && break; sleep 2
done
[[ -n "$snap" ]] || { log "no Snapshot appeared"; exit 1; }

log "lose the file, restore it from $snap"
kubectl -n apps exec app -- rm /data/blob
kubectl -n apps apply -f - <<YAML
apiVersion: backer.dev/v1alpha1
kind: RestoreJob
metadata: {name: blob-back}
spec: {snapshot: $snap, paths: [/blob], target: {pvc: data}}
YAML
kubectl -n apps wait --for=jsonpath='{.status.phase}'=Succeeded restorejob/blob-back --timeout=300s
kubectl -n apps exec app -- sha256sum -c /data/blob.sum
log "PASS: PVC backed up and restored byte-identical on kind"
