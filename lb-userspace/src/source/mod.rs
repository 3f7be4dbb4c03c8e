//! Where the cluster's Services and EndpointSlices come from. Every source
//! tells the agent what changed, object by object ([`Change`]), parsed into
//! the form the model keeps; [`Snapshot`] is the whole set at once, for
//! tests and one-shot callers.

pub mod file;
pub mod kube;

use crate::{
    model::{
        self, EndpointsObject, ObjectName, ServiceObject, SliceObject,
        manifest::{EndpointSlice, Endpoints, Node, Service},
    },
    problem::Problem,
};

/// Everything the model needs, as the source last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// `v1 Endpoints` (file source: mirrored into slices, as the
    /// EndpointSlice mirroring controller does in a cluster).
    pub endpoints: Vec<Endpoints>,
    /// Node objects (the kube source watches this node's; manifests may
    /// carry one to give a node its zone and addresses).
    pub nodes: Vec<Node>,
    /// Documents the source could not read as Kubernetes objects.
    pub problems: Vec<Problem>,
}

/// One object added or changed (`Some`), or deleted (`None`).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Service(ObjectName, Option<ServiceObject>),
    Slice(ObjectName, Option<SliceObject>),
    Endpoints(ObjectName, Option<EndpointsObject>),
    /// A Node object, by name, as the identity it gives a node.
    Node(String, Option<model::Node>),
    /// The problems of one part of the source (a file), replacing its
    /// earlier ones.
    Problems(String, Vec<Problem>),
}
