//! The Kubernetes source: watchers (list, then watch) over Services,
//! `discovery.k8s.io/v1` EndpointSlices and this node's Node object, kept
//! in stores the agent turns into the same [`Snapshot`] the file source
//! makes.
//!
//! The watchers run on a thread of their own (a single-threaded tokio
//! runtime). Each reconnects with backoff when the API server goes away and
//! re-lists when its watch is too old (`410 Gone`); a re-list replaces its
//! store only once complete, and the stores are never emptied by an error,
//! so the agent keeps serving the last good state through an outage. What
//! the model does not need is stripped before it is stored (managed fields,
//! resource versions, a Node's status beyond its addresses) to keep memory
//! small.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Node, NodeStatus, ObjectReference, Service},
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

use super::Snapshot;
use crate::{Error, problem::Problem};

/// At most this many Events a second leave the agent, whatever the number
/// of bad objects.
const EVENTS_PER_SECOND: u32 = 10;

/// One resource's objects by (namespace, name).
type Store<K> = BTreeMap<(String, String), K>;

/// What the watchers share with the agent.
#[derive(Default)]
struct Stores {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Which of the three watchers completed their first list.
    listed: [bool; 3],
}

/// The watchers' state, as the agent reads it.
#[derive(Default)]
pub struct Shared {
    stores: Mutex<Stores>,
    /// Bumped on every change of a store.
    generation: AtomicU64,
}

impl Shared {
    /// Changes whenever what [`Self::snapshot`] returns may have changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether every watcher has listed its resource once: before that, a
    /// snapshot would miss objects and the agent would delete their
    /// frontends.
    pub fn synced(&self) -> bool {
        self.lock().listed.iter().all(|listed| *listed)
    }

    /// The objects as the watchers last saw them, sorted by namespace and
    /// name.
    pub fn snapshot(&self) -> Snapshot {
        let stores = self.lock();
        Snapshot {
            services: stores.services.values().cloned().collect(),
            endpoint_slices: stores.endpoint_slices.values().cloned().collect(),
            nodes: stores.nodes.values().cloned().collect(),
            problems: Vec::new(),
        }
    }

    /// A reference to the object a problem names (`Service ns/name` or
    /// `EndpointSlice ns/name`), while the store holds it.
    fn reference(&self, object: &str) -> Option<ObjectReference> {
        let (kind, name) = object.split_once(' ')?;
        let (namespace, name) = name.split_once('/')?;
        let key = (namespace.to_owned(), name.to_owned());
        let stores = self.lock();
        match kind {
            "Service" => stores.services.get(&key).map(|o| o.object_ref(&())),
            "EndpointSlice" => stores.endpoint_slices.get(&key).map(|o| o.object_ref(&())),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stores> {
        // A panicking watcher cannot leave a store half-written: every
        // write is one map operation.
        self.stores.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A resource the source watches: where its store is, and what of it to
/// keep.
trait Watched:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
    /// Index of the watcher in [`Stores::listed`].
    const INDEX: usize;
    fn store(stores: &mut Stores) -> &mut Store<Self>;
    /// Drops what the model does not need.
    fn strip(&mut self) {}
}

impl Watched for Service {
    const INDEX: usize = 0;
    fn store(stores: &mut Stores) -> &mut Store<Self> {
        &mut stores.services
    }
}

impl Watched for EndpointSlice {
    const INDEX: usize = 1;
    fn store(stores: &mut Stores) -> &mut Store<Self> {
        &mut stores.endpoint_slices
    }
}

impl Watched for Node {
    const INDEX: usize = 2;
    fn store(stores: &mut Stores) -> &mut Store<Self> {
        &mut stores.nodes
    }
    fn strip(&mut self) {
        self.spec = None;
        self.status = self.status.take().map(|status| NodeStatus {
            addresses: status.addresses,
            ..NodeStatus::default()
        });
    }
}

/// The key and the stripped copy of an object as stored.
fn stored<K: Watched>(mut object: K) -> ((String, String), K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.resource_version = None;
    object.strip();
    let key = (object.namespace().unwrap_or_default(), object.name_any());
    (key, object)
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

/// `snapshot` as the kube source of node `node` would hold the same
/// objects: stripped, sorted by namespace and name, this node's Node only.
/// (For comparing the two sources.)
pub fn as_stored(snapshot: Snapshot, node: &str) -> Snapshot {
    fn store<K: Watched>(objects: Vec<K>) -> Vec<K> {
        objects
            .into_iter()
            .map(stored)
            .collect::<Store<K>>()
            .into_values()
            .collect()
    }
    Snapshot {
        services: store(snapshot.services),
        endpoint_slices: store(snapshot.endpoint_slices),
        nodes: store(snapshot.nodes)
            .into_iter()
            .filter(|n| n.name_any() == node)
            .collect(),
        problems: snapshot.problems,
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

/// Keeps the store of `K` equal to what the API server has, forever.
async fn watch<K: Watched>(api: Api<K>, config: watcher::Config, shared: &Shared) {
    let kind = K::kind(&());
    let mut events = watcher(api, config).default_backoff().boxed();
    // A (re-)list in progress: it replaces the store once complete.
    let mut listing: Option<Store<K>> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                // The store keeps the last good state; the stream retries
                // with backoff and re-lists when it must.
                warn!(%kind, "watch: {err}");
                continue;
            }
        };
        let mut stores = shared.lock();
        match event {
            watcher::Event::Init => listing = Some(Store::new()),
            watcher::Event::InitApply(object) => {
                let (key, object) = stored(object);
                listing.get_or_insert_default().insert(key, object);
            }
            watcher::Event::InitDone => {
                *K::store(&mut stores) = listing.take().unwrap_or_default();
                if !stores.listed[K::INDEX] {
                    info!(%kind, objects = K::store(&mut stores).len(), "listed");
                }
                stores.listed[K::INDEX] = true;
            }
            watcher::Event::Apply(object) => {
                let (key, object) = stored(object);
                K::store(&mut stores).insert(key, object);
            }
            watcher::Event::Delete(object) => {
                let (key, _) = stored(object);
                K::store(&mut stores).remove(&key);
            }
        }
        drop(stores);
        shared.generation.fetch_add(1, Ordering::AcqRel);
    }
}
