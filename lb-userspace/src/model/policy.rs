//! Which endpoints a node uses for one frontend: endpoint conditions
//! (KEP-1669), traffic policies (KEP-2086 internal, externalTrafficPolicy)
//! and topology (KEP-2433, KEP-3015), the way kube-proxy's
//! `CategorizeEndpoints` decides them.

use std::collections::BTreeSet;

use super::{Endpoint, Node, endpoints::EndpointInfo, service::Topology};

/// The backends of one frontend on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    /// Most preferred first; the kernel uses the first non-empty one.
    pub tiers: Vec<BTreeSet<Endpoint>>,
    /// No usable endpoint here although the Service has some elsewhere
    /// (Local policy without a local endpoint): drop, don't reject.
    pub drop_when_empty: bool,
}

/// Whether an endpoint can take new connections at all: ready, or (when no
/// endpoint of the set is ready) serving while terminating (KEP-1669).
fn usable(
    endpoints: &[(Endpoint, EndpointInfo)],
    keep: impl Fn(&EndpointInfo) -> bool,
) -> Vec<(Endpoint, &EndpointInfo)> {
    let pick = |ready: bool| -> Vec<(Endpoint, &EndpointInfo)> {
        endpoints
            .iter()
            .filter(|(_, info)| keep(info))
            .filter(|(_, info)| {
                if ready {
                    info.ready
                } else {
                    info.serving && info.terminating
                }
            })
            .map(|(e, info)| (*e, info))
            .collect()
    };
    let ready = pick(true);
    if ready.is_empty() { pick(false) } else { ready }
}

/// Whether the Service has any endpoint that could serve (anywhere).
fn has_any(endpoints: &[(Endpoint, EndpointInfo)]) -> bool {
    endpoints
        .iter()
        .any(|(_, i)| i.ready || (i.serving && i.terminating))
}

/// The tiers for a frontend whose traffic policy is Local (`local`) or
/// Cluster, on `node`, with the Service's `topology`.
pub fn tiers(
    endpoints: &[(Endpoint, EndpointInfo)],
    local: bool,
    topology: Topology,
    node: &Node,
) -> Tiers {
    if local {
        let is_local = |i: &EndpointInfo| i.node_name.as_deref() == Some(node.name.as_str());
        let local: BTreeSet<Endpoint> = usable(endpoints, is_local)
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        return Tiers {
            drop_when_empty: local.is_empty() && has_any(endpoints),
            tiers: vec![local],
        };
    }
    let all = usable(endpoints, |_| true);
    let set = |keep: &dyn Fn(&EndpointInfo) -> bool| -> BTreeSet<Endpoint> {
        all.iter()
            .filter(|(_, i)| keep(i))
            .map(|(e, _)| *e)
            .collect()
    };
    let everything = set(&|_| true);
    // Hints are used only when every candidate carries them: a half-hinted
    // slice set means the controller is mid-update (kube-proxy bails out).
    let zone = node.zone.as_deref();
    let zone_tier = (topology != Topology::None
        && !all.is_empty()
        && all.iter().all(|(_, i)| !i.for_zones.is_empty()))
    .then(|| set(&|i| zone.is_some_and(|z| i.for_zones.iter().any(|f| **f == *z))));
    let node_tier = (topology == Topology::SameNode
        && !all.is_empty()
        && all.iter().all(|(_, i)| !i.for_nodes.is_empty()))
    .then(|| set(&|i| i.for_nodes.iter().any(|n| **n == *node.name)));
    let tiers = [node_tier, zone_tier, Some(everything)]
        .into_iter()
        .flatten()
        .collect();
    Tiers {
        tiers,
        drop_when_empty: false,
    }
}
