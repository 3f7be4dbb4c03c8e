#!/usr/bin/env bash
# Smoke test of xlb on the kind cluster up.sh made: the docs' sample
# Deployment (agnhost netexec, which answers /hostname and /clientip), a
# ClusterIP Service, a NodePort Service (Cluster policy), a sticky one
# (ClientIP affinity) and a Local one; curled from a pod and from this
# host. Checks spread over the replicas, stickiness, and that the Local
# NodePort sees this host's address.
set -euo pipefail

cluster="${CLUSTER:-xlb}"
ctx=(--context "kind-$cluster")
ns=xlb-smoke

kubectl "${ctx[@]}" create namespace "$ns" --dry-run=client -o yaml | kubectl "${ctx[@]}" apply -f -
kubectl "${ctx[@]}" -n "$ns" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello}
spec:
  replicas: 3
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      containers:
      - name: agnhost
        image: registry.k8s.io/e2e-test-images/agnhost:2.53
        args: ["netexec", "--http-port=8080"]
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello-nodeport}
spec:
  type: NodePort
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello-sticky}
spec:
  selector: {app: hello}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello-local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
YAML
kubectl "${ctx[@]}" -n "$ns" rollout status deployment/hello --timeout=180s
kubectl "${ctx[@]}" -n "$ns" run curl --image=curlimages/curl:8.10.1 --restart=Never \
    --command -- sleep 3600 2>/dev/null || true
kubectl "${ctx[@]}" -n "$ns" wait --for=condition=Ready pod/curl --timeout=120s

# The distinct answers of 20 requests from the curl pod to $1.
from_pod() {
    kubectl "${ctx[@]}" -n "$ns" exec curl -- sh -c \
        "for i in \$(seq 20); do curl -s --max-time 2 $1; echo; done" | sort -u
}

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

# The InternalIP of node $1.
internal_ip() {
    kubectl "${ctx[@]}" get node "$1" \
        -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'
}

spread=$(from_pod http://hello/hostname | wc -l)
[ "$spread" -ge 2 ] || fail "ClusterIP: 20 requests reached $spread replica(s)"
echo "smoke: ClusterIP spreads over $spread replicas"

sticky=$(from_pod http://hello-sticky/hostname | wc -l)
[ "$sticky" -eq 1 ] || fail "ClientIP affinity: 20 requests reached $sticky replicas"
echo "smoke: ClientIP affinity sticks to one replica"

node_ip=$(internal_ip "$cluster-worker")
answers=$(for _ in $(seq 20); do curl -s --max-time 2 "http://$node_ip:30080/hostname"; echo; done | sort -u | wc -l)
[ "$answers" -ge 2 ] || fail "NodePort from the host: $answers replica(s)"
echo "smoke: NodePort from the host spreads over $answers replicas"

# Local policy: ask a node that runs a replica; the replica must see this
# host's own address on the kind network, not a node's.
pod_node=$(kubectl "${ctx[@]}" -n "$ns" get pods -l app=hello -o jsonpath='{.items[0].spec.nodeName}')
local_ip=$(internal_ip "$pod_node")
seen=$(curl -s --max-time 2 "http://$local_ip:30081/clientip" | cut -d: -f1)
host_ip=$(ip -4 route get "$local_ip" | sed -n 's/.* src \([0-9.]*\).*/\1/p')
[ "$seen" = "$host_ip" ] || fail "Local NodePort: the pod saw $seen, this host is $host_ip"
echo "smoke: Local NodePort keeps the client address ($seen)"

kubectl "${ctx[@]}" delete namespace "$ns" --wait=false
echo "smoke: all checks passed"
