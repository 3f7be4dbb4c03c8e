//! Where the cluster's Services and EndpointSlices come from. Every source
//! produces the same [`Snapshot`].

pub mod file;
pub mod kube;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::problem::Problem;

/// Everything the model needs, as the source last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Node objects (the kube source watches this node's; manifests may
    /// carry one to give a node its zone and addresses).
    pub nodes: Vec<Node>,
    /// Documents the source could not read as Kubernetes objects.
    pub problems: Vec<Problem>,
}
