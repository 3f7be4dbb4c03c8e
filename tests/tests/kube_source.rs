//! The kube source against the in-process API server double
//! (`xlb_tests::api_double`): after each step — first list, watch events
//! that add, modify and delete objects, bookmarks, a dropped watch
//! connection, a 410 Gone that forces a re-list, an outage — the objects
//! its changes leave the agent with equal what the file source's changes
//! give for the same YAML fixtures (the golden tests' own).

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex, time::Duration};

use anyhow::ensure;
use lb_userspace::source::{
    Change,
    file::FileSource,
    kube::{self, KubeSource},
};
use xlb_tests::{api_double::ApiDouble, cluster::eventually};

const NODE: &str = "node1";

/// A golden fixture's YAML.
fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lb-userspace/tests/golden")
        .join(format!("{name}.yaml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The objects a stream of changes leaves, by kind and name.
type Held = BTreeMap<String, Change>;

fn hold(held: &mut Held, changes: Vec<Change>) {
    for change in changes {
        let (key, present) = match &change {
            Change::Service(name, object) => (format!("Service {name}"), object.is_some()),
            Change::Slice(name, object) => (format!("EndpointSlice {name}"), object.is_some()),
            Change::Endpoints(name, object) => (format!("Endpoints {name}"), object.is_some()),
            Change::Node(name, node) => (format!("Node {name}"), node.is_some()),
            Change::Problems(..) => continue,
        };
        if present {
            held.insert(key, change);
        } else {
            held.remove(&key);
        }
    }
}

/// What the file source's changes leave of `yaml` (this node's Node
/// only, as the kube source watches no other).
fn file_held(yaml: &str) -> Held {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("objects.yaml");
    std::fs::write(&path, yaml).unwrap();
    let changes = FileSource::new(&path).scan();
    let problems: Vec<_> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Problems(_, problems) => Some(problems.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(problems, vec![], "fixtures the API would accept");
    let mut held = Held::new();
    hold(&mut held, changes);
    held.retain(|key, _| !key.starts_with("Node ") || *key == format!("Node {NODE}"));
    held
}

/// Waits until the source's changes leave exactly what the file source's
/// give for `yaml`.
fn converges(source: &KubeSource, held: &Mutex<Held>, yaml: &str, step: &str) {
    let want = file_held(yaml);
    eventually(step, Duration::from_secs(10), || {
        ensure!(source.shared.synced(), "not synced");
        let mut got = held.lock().unwrap();
        hold(&mut got, source.shared.take_changes());
        ensure!(
            *got == want,
            "held {:?}\nwant {:?}",
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        Ok(())
    })
    .unwrap();
}

fn start(api: &ApiDouble) -> (KubeSource, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    (kube::start(Some(&kubeconfig), NODE).unwrap(), dir)
}

#[test]
fn the_kube_source_holds_what_the_file_source_reads_through_every_api_event() {
    let api = ApiDouble::start().unwrap();
    let existing = [
        "clusterip-basic",
        "etp-local-with-local-endpoint",
        "multiport-named-targetport",
        "topology-mode-auto",
        "type-loadbalancer",
        "itp-local",
    ];

    // The first list.
    api.replace_all(&fixture(existing[0])).unwrap();
    let (source, _dir) = start(&api);
    let held = Mutex::new(Held::new());
    converges(&source, &held, &fixture(existing[0]), "first list");
    assert_eq!(api.service_lists(), 1);

    // Watch events: the next fixture adds, modifies and deletes objects.
    api.replace_all(&fixture(existing[1])).unwrap();
    converges(&source, &held, &fixture(existing[1]), "watch events");

    // Bookmarks flow on an idle watch; the next change still arrives on it
    // (no re-list).
    let before = api.bookmarks_sent();
    eventually(
        "bookmarks on the idle watches",
        Duration::from_secs(10),
        || {
            ensure!(api.bookmarks_sent() >= before + 6);
            Ok(())
        },
    )
    .unwrap();
    api.replace_all(&fixture(existing[2])).unwrap();
    converges(&source, &held, &fixture(existing[2]), "after bookmarks");
    assert_eq!(api.service_lists(), 1, "no re-list while the watch lives");

    // A dropped connection: the watch resumes from its version, changes
    // made meanwhile arrive.
    api.drop_watches();
    api.replace_all(&fixture(existing[3])).unwrap();
    converges(&source, &held, &fixture(existing[3]), "dropped watch");

    // 410 Gone: the log is compacted and the watch dropped; the client's
    // version is too old, so it re-lists.
    api.replace_all(&fixture(existing[4])).unwrap();
    api.compact();
    api.drop_watches();
    converges(&source, &held, &fixture(existing[4]), "after 410");
    eventually("re-listed after 410", Duration::from_secs(10), || {
        ensure!(api.gone_answers() >= 1 && api.service_lists() >= 2);
        Ok(())
    })
    .unwrap();

    // An outage: the source keeps the last state, then catches up.
    api.set_down(true);
    eventually(
        "the watchers meet the outage",
        Duration::from_secs(10),
        || {
            ensure!(api.refused() >= 3);
            Ok(())
        },
    )
    .unwrap();
    let mut kept = held.lock().unwrap().clone();
    hold(&mut kept, source.shared.take_changes());
    assert_eq!(
        kept,
        file_held(&fixture(existing[4])),
        "the last good state is kept while the API server is down"
    );
    *held.lock().unwrap() = kept;
    api.replace_all(&fixture(existing[5])).unwrap();
    api.set_down(false);
    converges(&source, &held, &fixture(existing[5]), "after the outage");
}
