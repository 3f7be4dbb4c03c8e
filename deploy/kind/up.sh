#!/usr/bin/env bash
# Creates the kind cluster of cluster.yaml (no kube-proxy), builds the xlb
# image, loads it into the nodes, deploys the kind overlay and waits until
# every node's agent is ready.
#
#   deploy/kind/up.sh            # cluster "xlb"
#   CLUSTER=other deploy/kind/up.sh
set -euo pipefail

cluster="${CLUSTER:-xlb}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

for tool in kind kubectl docker; do
    command -v "$tool" >/dev/null || { echo "up.sh: $tool is needed" >&2; exit 1; }
done

if ! kind get clusters | grep -qx "$cluster"; then
    kind create cluster --name "$cluster" --config "$here/cluster.yaml"
fi
docker build -f "$root/deploy/Dockerfile" -t xlb:dev "$root"
kind load docker-image xlb:dev --name "$cluster"
# The overlay points the agents at this cluster's control plane.
kubectl kustomize "$here" | sed "s/xlb-control-plane/${cluster}-control-plane/" \
    | kubectl --context "kind-$cluster" apply -f -
kubectl --context "kind-$cluster" -n xlb-system rollout status daemonset/xlb --timeout=300s
# Without kube-proxy, nodes and CoreDNS turn ready once xlb serves the
# `kubernetes` Service.
kubectl --context "kind-$cluster" wait --for=condition=Ready nodes --all --timeout=300s
kubectl --context "kind-$cluster" -n kube-system rollout status deployment/coredns --timeout=300s
echo "xlb is running on kind cluster $cluster"
