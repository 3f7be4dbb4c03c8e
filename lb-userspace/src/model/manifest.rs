//! Services, EndpointSlices and Nodes as the model reads them: only the
//! fields it uses, deserialized straight from a manifest or converted from
//! the API's objects (the kube source). Everything else an object carries
//! (managed fields, target references, conditions the model ignores) is
//! skipped while parsing, never stored.
//!
//! Field names follow the Kubernetes API (and `k8s-openapi`'s Rust names);
//! a field left out reads as `k8s-openapi` reads it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `metadata`: the parts the model reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A `v1 Service`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Service {
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: Metadata,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    pub load_balancer_source_ranges: Option<Vec<String>>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    pub ports: Option<Vec<ServicePort>>,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub health_check_node_port: Option<i32>,
    pub traffic_distribution: Option<String>,
    /// Only whether there is one matters: the EndpointSlice mirroring
    /// controller mirrors the Endpoints of Services without one.
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub port: i32,
    pub node_port: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientIpConfig {
    pub timeout_seconds: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
}

/// A `discovery.k8s.io/v1 EndpointSlice`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: Metadata,
    #[serde(deserialize_with = "null_as_default")]
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    #[serde(deserialize_with = "null_as_default")]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub hints: Option<EndpointHints>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointHints {
    pub for_zones: Option<Vec<Named>>,
    pub for_nodes: Option<Vec<Named>>,
}

/// A hint's zone or node.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Named {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
}

/// A `v1 Endpoints`: what people write for a Service without a selector
/// (the EndpointSlice mirroring controller turns it into slices).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Endpoints {
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: Metadata,
    #[serde(deserialize_with = "null_as_default")]
    pub subsets: Vec<EndpointSubset>,
}

/// Addresses that share a set of ports.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointSubset {
    #[serde(deserialize_with = "null_as_default")]
    pub addresses: Vec<EndpointAddress>,
    #[serde(deserialize_with = "null_as_default")]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(deserialize_with = "null_as_default")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointAddress {
    #[serde(deserialize_with = "null_as_default")]
    pub ip: String,
    pub node_name: Option<String>,
}

/// A `v1 Node`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Node {
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: Metadata,
    pub status: Option<NodeStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct NodeStatus {
    pub addresses: Option<Vec<NodeAddress>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct NodeAddress {
    #[serde(rename = "type", deserialize_with = "null_as_default")]
    pub type_: String,
    #[serde(deserialize_with = "null_as_default")]
    pub address: String,
}

/// A required field left out or written as `null` reads as its zero value,
/// as `k8s-openapi` reads it; the model then reports what is wrong with it
/// (a port 0, a slice of no address type).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_what_the_model_does_not_read_and_reads_nulls_as_k8s_openapi_does() {
        let slice: EndpointSlice = serde_yaml_ng::from_str(
            r#"
metadata:
  name: web-abc
  managedFields: [{manager: kube-controller-manager, fieldsV1: {f:a: {}}}]
  labels: {kubernetes.io/service-name: web}
endpoints:
- addresses: null
  targetRef: {kind: Pod, name: web-0}
  conditions: {ready: true, unknownCondition: true}
ports: [{port: null, appProtocol: http}]
"#,
        )
        .unwrap();
        assert_eq!(slice.metadata.name.as_deref(), Some("web-abc"));
        assert_eq!(
            slice.address_type, "",
            "left out: empty, as k8s-openapi reads it"
        );
        assert_eq!(slice.endpoints.len(), 1);
        assert!(slice.endpoints[0].addresses.is_empty());
        assert_eq!(slice.ports.unwrap()[0].port, None);
        let service: Service =
            serde_yaml_ng::from_str("metadata: null\nspec: {ports: [{port: null}]}\n").unwrap();
        assert_eq!(service.metadata, Metadata::default());
        assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 0);
    }
}
