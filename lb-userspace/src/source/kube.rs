//! The Kubernetes source: watchers (list, then watch) over Services,
//! `discovery.k8s.io/v1` EndpointSlices and this node's Node object, whose
//! events become per-object changes for the agent ([`Change`]), parsed into
//! the form the model keeps. No copy of the API objects is kept: only each
//! object's uid (for Events) and, per re-list, the names seen.
//!
//! The watchers run on a thread of their own (a single-threaded tokio
//! runtime). Each reconnects with backoff when the API server goes away and
//! re-lists when its watch is too old (`410 Gone`); a re-list's objects are
//! changes like any other (an unchanged object changes nothing in the
//! model), and the objects it no longer finds are deleted once it is
//! complete. Nothing is deleted on an error, so the agent keeps serving the
//! last good state through an outage.

use std::{
    collections::{HashMap, HashSet},
    fmt::Debug,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Change;
use crate::{
    Error,
    model::{self, ObjectName},
    problem::Problem,
};

/// At most this many Events a second leave the agent, whatever the number
/// of bad objects.
const EVENTS_PER_SECOND: u32 = 10;

/// What the watchers share with the agent.
#[derive(Default)]
struct State {
    /// Changes the agent has not taken yet.
    changes: Vec<Change>,
    /// The uid of every object held, by kind and name (for Events).
    uids: [HashMap<ObjectName, String>; 3],
    /// Which of the three watchers completed their first list.
    listed: [bool; 3],
}

/// The watchers' state, as the agent reads it.
#[derive(Default)]
pub struct Shared {
    state: Mutex<State>,
}

impl Shared {
    /// Whether every watcher has listed its resource once: before that, the
    /// model would miss objects and the agent would delete their frontends.
    pub fn synced(&self) -> bool {
        self.lock().listed.iter().all(|listed| *listed)
    }

    /// The changes since the last call.
    pub fn take_changes(&self) -> Vec<Change> {
        std::mem::take(&mut self.lock().changes)
    }

    /// A reference to the object a problem names (`Service ns/name` or
    /// `EndpointSlice ns/name`), while the source holds it.
    fn reference(&self, object: &str) -> Option<ObjectReference> {
        let (kind, name) = object.split_once(' ')?;
        let (namespace, name) = name.split_once('/')?;
        let (index, api_version) = match kind {
            "Service" => (Service::INDEX, "v1"),
            "EndpointSlice" => (EndpointSlice::INDEX, "discovery.k8s.io/v1"),
            _ => return None,
        };
        let uid = self.lock().uids[index]
            .get(&ObjectName::new(namespace, name))?
            .clone();
        Some(ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(uid),
            ..ObjectReference::default()
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking watcher cannot leave the state half-written: every
        // write is one operation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A resource the source watches, and the change each of its objects is.
trait Watched:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
    /// Index of the watcher in [`State::listed`] and [`State::uids`].
    const INDEX: usize;
    /// The object as a change (added or modified).
    fn change(&self) -> (ObjectName, Change);
    /// The deletion of the object named `name`.
    fn deleted(name: ObjectName) -> Change;
}

impl Watched for Service {
    const INDEX: usize = 0;
    fn change(&self) -> (ObjectName, Change) {
        let (name, object) = model::parse_service(&slim::service(self));
        (name.clone(), Change::Service(name, Some(object)))
    }
    fn deleted(name: ObjectName) -> Change {
        Change::Service(name, None)
    }
}

impl Watched for EndpointSlice {
    const INDEX: usize = 1;
    fn change(&self) -> (ObjectName, Change) {
        let (name, object) = model::parse_slice(&slim::endpoint_slice(self));
        (name.clone(), Change::Slice(name, Some(object)))
    }
    fn deleted(name: ObjectName) -> Change {
        Change::Slice(name, None)
    }
}

impl Watched for Node {
    const INDEX: usize = 2;
    fn change(&self) -> (ObjectName, Change) {
        let node = model::Node::from_manifest(&slim::node(self));
        let name = ObjectName::of(&slim::metadata(self.meta()));
        (name, Change::Node(node.name.clone(), Some(node)))
    }
    fn deleted(name: ObjectName) -> Change {
        Change::Node(name.name, None)
    }
}

/// The running source.
pub struct KubeSource {
    pub shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Problem>,
}

impl KubeSource {
    /// Reports `problem` as a Warning Event on the object it names. The
    /// agent reports each problem once, when it first appears.
    pub fn report(&self, problem: &Problem) {
        let _ = self.events.send(problem.clone());
    }
}

/// Connects to the API server — with `kubeconfig`, or else in-cluster
/// config or the default kubeconfig — and starts the watchers and the Event
/// publisher on a thread of their own. `node` names this node (only its
/// Node object is watched; Events name it as the reporting instance).
pub fn start(kubeconfig: Option<&Path>, node: &str) -> Result<KubeSource, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Kube(format!("a tokio runtime: {e}")))?;
    let client = runtime.block_on(client(kubeconfig))?;
    let shared = Arc::new(Shared::default());
    let node_selector = format!("metadata.name={node}");
    let (events, problems) = mpsc::unbounded_channel();
    let reporter = Reporter {
        controller: "xlb".into(),
        instance: Some(node.to_owned()),
    };
    let state = shared.clone();
    std::thread::Builder::new()
        .name("kube-source".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::join!(
                    watch::<Service>(Api::all(client.clone()), watcher::Config::default(), &state),
                    watch::<EndpointSlice>(
                        Api::all(client.clone()),
                        watcher::Config::default(),
                        &state
                    ),
                    watch::<Node>(
                        Api::all(client.clone()),
                        watcher::Config::default().fields(&node_selector),
                        &state
                    ),
                    publish_events(Recorder::new(client, reporter), problems, &state),
                );
            });
        })
        .map_err(|e| Error::Kube(format!("spawning the kube source: {e}")))?;
    Ok(KubeSource { shared, events })
}

async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| Error::Kube(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Kube(format!("{}: {e}", path.display())))?
        }
        None => Config::infer()
            .await
            .map_err(|e| Error::Kube(format!("Kubernetes client config: {e}")))?,
    };
    Client::try_from(config).map_err(|e| Error::Kube(format!("Kubernetes client: {e}")))
}

/// Publishes the problems sent to it as Warning Events, rate-limited.
async fn publish_events(
    recorder: Recorder,
    mut problems: mpsc::UnboundedReceiver<Problem>,
    shared: &Shared,
) {
    while let Some(problem) = problems.recv().await {
        let Some(reference) = shared.reference(&problem.object) else {
            continue;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: problem.reason.event_reason().into(),
            note: Some(format!("xlb skipped it: {}", problem.reason)),
            action: "Program".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &reference).await {
            warn!(object = %problem.object, "publishing an Event: {err}");
        }
        tokio::time::sleep(Duration::from_secs(1) / EVENTS_PER_SECOND).await;
    }
}

/// Turns the API server's objects of `K` into changes, forever.
async fn watch<K: Watched>(api: Api<K>, config: watcher::Config, shared: &Shared) {
    let kind = K::kind(&());
    let mut events = watcher(api, config).default_backoff().boxed();
    // The names a (re-)list in progress has seen: once it is complete, the
    // objects it did not see are deleted.
    let mut listing: Option<HashSet<ObjectName>> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                // Nothing is deleted; the stream retries with backoff and
                // re-lists when it must.
                warn!(%kind, "watch: {err}");
                continue;
            }
        };
        let mut state = shared.lock();
        let state = &mut *state;
        match event {
            watcher::Event::Init => listing = Some(HashSet::new()),
            watcher::Event::InitApply(object) => {
                let (name, change) = object.change();
                state.uids[K::INDEX].insert(name.clone(), object.uid().unwrap_or_default());
                state.changes.push(change);
                listing.get_or_insert_default().insert(name);
            }
            watcher::Event::InitDone => {
                let seen = listing.take().unwrap_or_default();
                let uids = &mut state.uids[K::INDEX];
                let gone: Vec<ObjectName> = uids
                    .keys()
                    .filter(|name| !seen.contains(*name))
                    .cloned()
                    .collect();
                for name in gone {
                    uids.remove(&name);
                    state.changes.push(K::deleted(name));
                }
                if !state.listed[K::INDEX] {
                    info!(%kind, objects = state.uids[K::INDEX].len(), "listed");
                }
                state.listed[K::INDEX] = true;
            }
            watcher::Event::Apply(object) => {
                let (name, change) = object.change();
                state.uids[K::INDEX].insert(name, object.uid().unwrap_or_default());
                state.changes.push(change);
            }
            watcher::Event::Delete(object) => {
                let name = ObjectName::of(&slim::metadata(object.meta()));
                state.uids[K::INDEX].remove(&name);
                state.changes.push(K::deleted(name));
            }
        }
    }
}

/// The API's objects in the form the model reads ([`model::manifest`]):
/// the same fields, the rest left behind.
mod slim {
    use k8s_openapi::{
        api::{core::v1, discovery::v1 as discovery},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use crate::model::manifest::*;

    pub fn metadata(meta: &ObjectMeta) -> Metadata {
        Metadata {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone(),
            annotations: meta.annotations.clone(),
        }
    }

    pub fn service(service: &v1::Service) -> Service {
        Service {
            metadata: metadata(&service.metadata),
            spec: service.spec.as_ref().map(|spec| ServiceSpec {
                type_: spec.type_.clone(),
                cluster_ip: spec.cluster_ip.clone(),
                cluster_ips: spec.cluster_ips.clone(),
                external_ips: spec.external_ips.clone(),
                load_balancer_source_ranges: spec.load_balancer_source_ranges.clone(),
                allocate_load_balancer_node_ports: spec.allocate_load_balancer_node_ports,
                ports: spec.ports.as_ref().map(|ports| {
                    ports
                        .iter()
                        .map(|port| ServicePort {
                            name: port.name.clone(),
                            protocol: port.protocol.clone(),
                            port: port.port,
                            node_port: port.node_port,
                        })
                        .collect()
                }),
                session_affinity: spec.session_affinity.clone(),
                session_affinity_config: spec.session_affinity_config.as_ref().map(|config| {
                    SessionAffinityConfig {
                        client_ip: config.client_ip.as_ref().map(|client_ip| ClientIpConfig {
                            timeout_seconds: client_ip.timeout_seconds,
                        }),
                    }
                }),
                external_traffic_policy: spec.external_traffic_policy.clone(),
                internal_traffic_policy: spec.internal_traffic_policy.clone(),
                health_check_node_port: spec.health_check_node_port,
                traffic_distribution: spec.traffic_distribution.clone(),
                // Only the file source mirrors Endpoints (in a cluster the
                // mirroring controller writes the slices).
                selector: None,
            }),
            status: service.status.as_ref().map(|status| ServiceStatus {
                load_balancer: status.load_balancer.as_ref().map(|lb| LoadBalancerStatus {
                    ingress: lb.ingress.as_ref().map(|ingress| {
                        ingress
                            .iter()
                            .map(|ingress| LoadBalancerIngress {
                                ip: ingress.ip.clone(),
                            })
                            .collect()
                    }),
                }),
            }),
        }
    }

    pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> EndpointSlice {
        EndpointSlice {
            metadata: metadata(&slice.metadata),
            address_type: slice.address_type.clone(),
            ports: slice.ports.as_ref().map(|ports| {
                ports
                    .iter()
                    .map(|port| EndpointPort {
                        name: port.name.clone(),
                        port: port.port,
                        protocol: port.protocol.clone(),
                    })
                    .collect()
            }),
            endpoints: slice
                .endpoints
                .iter()
                .flatten()
                .map(|endpoint| Endpoint {
                    addresses: endpoint.addresses.clone(),
                    conditions: endpoint.conditions.as_ref().map(|c| EndpointConditions {
                        ready: c.ready,
                        serving: c.serving,
                        terminating: c.terminating,
                    }),
                    node_name: endpoint.node_name.clone(),
                    zone: endpoint.zone.clone(),
                    hints: endpoint.hints.as_ref().map(|hints| EndpointHints {
                        for_zones: hints.for_zones.as_ref().map(|zones| {
                            zones
                                .iter()
                                .map(|z| Named {
                                    name: z.name.clone(),
                                })
                                .collect()
                        }),
                        for_nodes: hints.for_nodes.as_ref().map(|nodes| {
                            nodes
                                .iter()
                                .map(|n| Named {
                                    name: n.name.clone(),
                                })
                                .collect()
                        }),
                    }),
                })
                .collect(),
        }
    }

    pub fn node(node: &v1::Node) -> Node {
        Node {
            metadata: metadata(&node.metadata),
            status: node.status.as_ref().map(|status| NodeStatus {
                addresses: status.addresses.as_ref().map(|addresses| {
                    addresses
                        .iter()
                        .map(|a| NodeAddress {
                            type_: a.type_.clone(),
                            address: a.address.clone(),
                        })
                        .collect()
                }),
            }),
        }
    }
}
