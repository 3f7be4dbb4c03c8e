//! The file source: multi-document Kubernetes YAML (Services and
//! `discovery.k8s.io/v1` EndpointSlices, also inside `kind: List` as
//! `kubectl get -o yaml` prints several objects) from a file or a directory,
//! read incrementally ([`FileSource`]) or at once ([`read`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt, fs,
    hash::{Hash, Hasher},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_yaml_ng::Value;

use super::{Change, Snapshot};
use crate::{
    model::{self, ObjectName},
    problem::{Invalid, Problem},
};

/// The manifest files under `path`: the file itself, or the `*.yaml`,
/// `*.yml` and `*.json` files of a directory (not recursive), sorted.
pub fn manifest_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(path)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The file source, kept up to date scan by scan: each manifest file's
/// identity (device, inode, size, modification and change times) and
/// content hash, and the objects it defines. A scan reads only the files
/// whose identity changed, parses only those whose content did, and returns
/// the net change per object over the whole scan — an object that moves
/// from one file to another is changed, never deleted in between.
///
/// An object defined in two files is a problem; the first file by path
/// wins, on every node alike.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// The files that define each object.
    defined_in: HashMap<ObjectKey, BTreeSet<PathBuf>>,
}

/// An object, by kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ObjectKey {
    Service(ObjectName),
    Slice(ObjectName),
    Node(String),
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Service(name) => write!(f, "Service {name}"),
            ObjectKey::Slice(name) => write!(f, "EndpointSlice {name}"),
            ObjectKey::Node(name) => write!(f, "Node {name}"),
        }
    }
}

#[derive(Debug)]
struct CachedFile {
    stat: FileStat,
    hash: u64,
    keys: BTreeSet<ObjectKey>,
}

/// What identifies a file's contents without reading them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FileStat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// A file modified this recently may change again within the same
/// timestamp tick, its size unchanged: its contents are hashed again until
/// it is older (as git treats "racily clean" files).
const RACY: Duration = Duration::from_secs(2);

impl FileStat {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    fn is_racy(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let changed = Duration::new(self.mtime.0.max(self.ctime.0).max(0) as u64, 0);
        now.saturating_sub(changed) < RACY
    }
}

/// One file's objects, parsed.
struct ParsedFile {
    objects: BTreeMap<ObjectKey, Change>,
    problems: Vec<Problem>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            files: BTreeMap::new(),
            defined_in: HashMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What changed since the last scan (the first returns everything).
    pub fn scan(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        let listed = match manifest_files(&self.path) {
            Ok(files) => {
                changes.push(Change::Problems(self.origin(), Vec::new()));
                files
            }
            Err(err) => {
                let problem = Problem::new(self.origin(), Invalid::Parse(err.to_string()));
                changes.push(Change::Problems(self.origin(), vec![problem]));
                Vec::new()
            }
        };
        // Files whose contents changed (parsed), or that went (`None`).
        let mut changed: BTreeMap<PathBuf, Option<(FileStat, u64, ParsedFile)>> = BTreeMap::new();
        for file in &listed {
            let Some((stat, read)) = stat_and_read(file, self.files.get(file)) else {
                continue;
            };
            let cached = self.files.get_mut(file);
            let (hash, parsed) = match read {
                Ok(bytes) => {
                    let hash = content_hash(&bytes);
                    if let Some(cached) = cached.filter(|c| c.hash == hash) {
                        cached.stat = stat;
                        continue;
                    }
                    (hash, parse_file(file, &String::from_utf8_lossy(&bytes)))
                }
                Err(err) => {
                    let problem = Problem::new(origin(file), Invalid::Parse(err.to_string()));
                    let parsed = ParsedFile {
                        objects: BTreeMap::new(),
                        problems: vec![problem],
                    };
                    (0, parsed)
                }
            };
            changed.insert(file.clone(), Some((stat, hash, parsed)));
        }
        for file in self.files.keys() {
            if !listed.contains(file) {
                changed.insert(file.clone(), None);
            }
        }
        // Who defined each touched object before (and whether twice), and
        // who does now.
        let mut touched: BTreeMap<ObjectKey, (Option<PathBuf>, bool)> = BTreeMap::new();
        for (file, new) in &changed {
            let old_keys = self
                .files
                .get(file)
                .map(|c| c.keys.clone())
                .unwrap_or_default();
            let new_keys: BTreeSet<ObjectKey> = new
                .as_ref()
                .map(|(_, _, parsed)| parsed.objects.keys().cloned().collect())
                .unwrap_or_default();
            for key in old_keys.iter().chain(&new_keys) {
                touched.entry(key.clone()).or_insert_with(|| {
                    let twice = self.defined_in.get(key).is_some_and(|f| f.len() > 1);
                    (self.winner(key).cloned(), twice)
                });
            }
            for key in old_keys.difference(&new_keys) {
                if let Some(files) = self.defined_in.get_mut(key) {
                    files.remove(file);
                    if files.is_empty() {
                        self.defined_in.remove(key);
                    }
                }
            }
            for key in &new_keys {
                self.defined_in
                    .entry(key.clone())
                    .or_default()
                    .insert(file.clone());
            }
        }
        for (key, (before, was_twice)) in touched {
            let now = self.winner(&key).cloned();
            let duplicates = self.duplicates(&key);
            if was_twice || !duplicates.is_empty() {
                changes.push(Change::Problems(format!("{key} defined twice"), duplicates));
            }
            let object = match &now {
                None => Some(deleted(&key)),
                // Its file changed: its object as parsed now.
                Some(file) if changed.contains_key(file) => changed[file]
                    .as_ref()
                    .and_then(|(_, _, parsed)| parsed.objects.get(&key).cloned()),
                // Another file's definition takes over: read it again.
                Some(file) if before.as_ref() != Some(file) => reparse(file, &key),
                Some(_) => None,
            };
            changes.extend(object);
        }
        for (file, new) in changed {
            match new {
                Some((stat, hash, parsed)) => {
                    changes.push(Change::Problems(origin(&file), parsed.problems));
                    let keys = parsed.objects.into_keys().collect();
                    self.files.insert(file, CachedFile { stat, hash, keys });
                }
                None => {
                    changes.push(Change::Problems(origin(&file), Vec::new()));
                    self.files.remove(&file);
                }
            }
        }
        changes
    }

    fn origin(&self) -> String {
        origin(&self.path)
    }

    /// The file whose definition of `key` is used: the first by path.
    fn winner(&self, key: &ObjectKey) -> Option<&PathBuf> {
        self.defined_in.get(key).and_then(|files| files.first())
    }

    /// The problems of `key` being defined in more than one file.
    fn duplicates(&self, key: &ObjectKey) -> Vec<Problem> {
        let Some(files) = self.defined_in.get(key).filter(|f| f.len() > 1) else {
            return Vec::new();
        };
        let mut files = files.iter();
        let winner = files.next().expect("two or more");
        files
            .map(|file| {
                let what = format!(
                    "{key} is also defined in {}, which is used",
                    winner.display()
                );
                Problem::new(origin(file), Invalid::Conflict(what))
            })
            .collect()
    }
}

/// How problems name a file.
fn origin(path: &Path) -> String {
    path.display().to_string()
}

/// The file's identity, and its contents when they may have changed
/// (`None`: unchanged, or gone between the listing and now).
fn stat_and_read(
    file: &Path,
    cached: Option<&CachedFile>,
) -> Option<(FileStat, std::io::Result<Vec<u8>>)> {
    let stat = match fs::metadata(file) {
        Ok(meta) => FileStat::of(&meta),
        Err(err) => return Some((FileStat::default(), Err(err))),
    };
    if cached.is_some_and(|c| c.stat == stat && !stat.is_racy()) {
        return None;
    }
    Some((stat, fs::read(file)))
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// The deletion of `key`.
fn deleted(key: &ObjectKey) -> Change {
    match key {
        ObjectKey::Service(name) => Change::Service(name.clone(), None),
        ObjectKey::Slice(name) => Change::Slice(name.clone(), None),
        ObjectKey::Node(name) => Change::Node(name.clone(), None),
    }
}

/// `key` as `file` defines it now.
fn reparse(file: &Path, key: &ObjectKey) -> Option<Change> {
    let text = fs::read_to_string(file).ok()?;
    parse_file(file, &text).objects.remove(key)
}

/// The objects of one file, parsed into the form the model keeps.
fn parse_file(file: &Path, text: &str) -> ParsedFile {
    let mut snapshot = Snapshot::default();
    parse_into(&origin(file), text, &mut snapshot);
    let mut objects = BTreeMap::new();
    for service in &snapshot.services {
        let (name, object) = model::parse_service(service);
        objects.insert(
            ObjectKey::Service(name.clone()),
            Change::Service(name, Some(object)),
        );
    }
    for slice in &snapshot.endpoint_slices {
        let (name, object) = model::parse_slice(slice);
        objects.insert(
            ObjectKey::Slice(name.clone()),
            Change::Slice(name, Some(object)),
        );
    }
    for node in &snapshot.nodes {
        let node = model::Node::from_k8s(node);
        objects.insert(
            ObjectKey::Node(node.name.clone()),
            Change::Node(node.name.clone(), Some(node)),
        );
    }
    ParsedFile {
        objects,
        problems: snapshot.problems,
    }
}

/// Reads every manifest under `path` into a snapshot. Unreadable files and
/// documents that don't parse become problems; the rest is kept.
pub fn read(path: &Path) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let files = match manifest_files(path) {
        Ok(files) => files,
        Err(err) => {
            let reason = Invalid::Parse(err.to_string());
            snapshot
                .problems
                .push(Problem::new(path.display().to_string(), reason));
            return snapshot;
        }
    };
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => parse_into(&file.display().to_string(), &text, &mut snapshot),
            Err(err) => {
                let reason = Invalid::Parse(err.to_string());
                snapshot
                    .problems
                    .push(Problem::new(file.display().to_string(), reason));
            }
        }
    }
    snapshot
}

/// Parses the YAML documents of one file (named `origin` in problems).
pub fn parse_into(origin: &str, text: &str, snapshot: &mut Snapshot) {
    for (index, document) in documents(text).into_iter().enumerate() {
        let name = format!("{origin} document {}", index + 1);
        match serde_yaml_ng::from_str::<Value>(&document) {
            Ok(Value::Null) => {}
            Ok(value) => add_object(&name, value, snapshot),
            Err(err) => snapshot
                .problems
                .push(Problem::new(name, Invalid::Parse(err.to_string()))),
        }
    }
}

/// Splits a YAML stream at its `---` lines. Done here rather than by the
/// YAML parser, which stops at the first broken document: one bad document
/// must not hide the ones after it.
fn documents(text: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            documents.push(String::new());
            continue;
        }
        let current = documents.last_mut().expect("never empty");
        current.push_str(line);
        current.push('\n');
    }
    documents.retain(|d| !d.trim().is_empty());
    documents
}

fn add_object(name: &str, value: Value, snapshot: &mut Snapshot) {
    let field = |name| {
        value
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let result = match (api_version.as_str(), kind.as_str()) {
        (_, "List") => {
            let items = match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => Vec::new(),
            };
            for (i, item) in items.into_iter().enumerate() {
                add_object(&format!("{name} item {}", i + 1), item, snapshot);
            }
            Ok(())
        }
        ("v1", "Service") => serde_yaml_ng::from_value::<Service>(value)
            .map(|service| snapshot.services.push(service)),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            serde_yaml_ng::from_value::<EndpointSlice>(value)
                .map(|slice| snapshot.endpoint_slices.push(slice))
        }
        ("v1", "Node") => {
            serde_yaml_ng::from_value::<Node>(value).map(|node| snapshot.nodes.push(node))
        }
        // Other kinds (Deployments, Pods …) may share the files; not ours.
        _ => Ok(()),
    };
    if let Err(err) = result {
        let object = format!("{name} ({kind})");
        snapshot
            .problems
            .push(Problem::new(object, Invalid::Parse(err.to_string())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_documents_lists_and_skips_other_kinds() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: a-1, namespace: default, labels: {kubernetes.io/service-name: a}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.1.5]}]
---
"#;
        let mut snapshot = Snapshot::default();
        parse_into("m.yaml", text, &mut snapshot);
        assert!(snapshot.problems.is_empty(), "{:?}", snapshot.problems);
        assert_eq!(snapshot.services.len(), 1);
        assert_eq!(snapshot.endpoint_slices.len(), 1);
    }

    #[test]
    fn a_broken_document_is_one_problem_and_the_rest_is_kept() {
        let text = "kind: Service\napiVersion: v1\nmetadata: {name: ok}\n---\nkind: [unclosed\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: 7}\n";
        let mut snapshot = Snapshot::default();
        parse_into("m.yaml", text, &mut snapshot);
        assert_eq!(snapshot.services.len(), 1);
        assert_eq!(snapshot.problems.len(), 2, "{:?}", snapshot.problems);
        assert!(snapshot.problems[0].object.contains("document 2"));
        assert!(snapshot.problems[1].object.contains("document 3"));
    }

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    /// The object changes of a scan (problems left out), as text.
    fn objects(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .filter_map(|change| match change {
                Change::Service(name, object) => Some(format!(
                    "{name} {}",
                    object
                        .as_ref()
                        .and_then(|o| o.service.as_ref())
                        .map_or("deleted".into(), |s| s.cluster_ips[0].to_string())
                )),
                Change::Slice(name, _) => Some(format!("slice {name}")),
                Change::Node(name, _) => Some(format!("node {name}")),
                Change::Problems(..) => None,
            })
            .collect()
    }

    fn problems(changes: &[Change]) -> Vec<Problem> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Problems(_, problems) => Some(problems.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn a_scan_returns_only_what_changed_and_a_move_is_never_a_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        fs::write(&a, svc("x", "10.96.0.1") + "---\n" + &svc("y", "10.96.0.2")).unwrap();
        let mut source = FileSource::new(dir.path());
        assert_eq!(
            objects(&source.scan()),
            ["default/x 10.96.0.1", "default/y 10.96.0.2"]
        );
        assert_eq!(
            objects(&source.scan()),
            Vec::<String>::new(),
            "nothing changed"
        );
        // y moves to b.yaml in one step: changed (unchanged here), not
        // deleted; x changes.
        fs::write(&a, svc("x", "10.96.0.3")).unwrap();
        fs::write(&b, svc("y", "10.96.0.2")).unwrap();
        assert_eq!(
            objects(&source.scan()),
            ["default/x 10.96.0.3", "default/y 10.96.0.2"]
        );
        // A file that goes takes its objects with it.
        fs::remove_file(&b).unwrap();
        assert_eq!(objects(&source.scan()), ["default/y deleted"]);
    }

    #[test]
    fn an_object_defined_twice_is_reported_and_the_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        fs::write(&a, svc("x", "10.96.0.1")).unwrap();
        fs::write(&b, svc("x", "10.96.0.2")).unwrap();
        let mut source = FileSource::new(dir.path());
        let changes = source.scan();
        assert_eq!(objects(&changes), ["default/x 10.96.0.1"]);
        let problems = problems(&changes);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].object.ends_with("b.yaml"), "{problems:?}");
        assert_eq!(problems[0].reason.label(), "conflict");
        // a.yaml lets go: b.yaml's takes over, and the problem goes.
        fs::write(&a, "").unwrap();
        let changes = source.scan();
        assert_eq!(objects(&changes), ["default/x 10.96.0.2"]);
        assert!(
            changes
                .iter()
                .any(|c| matches!(c, Change::Problems(o, p) if o.contains("defined twice") && p.is_empty())),
            "{changes:?}"
        );
    }

    #[test]
    fn an_edit_in_place_within_one_timestamp_tick_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, svc("x", "10.96.0.1")).unwrap();
        let mut source = FileSource::new(&file);
        source.scan();
        // Rewritten in place, same size, and within the timestamp tick of
        // the scan: the identity the scan recorded is the file's identity
        // now. The contents are hashed again while the file is this
        // recent.
        fs::write(&file, svc("x", "10.96.0.9")).unwrap();
        let now = FileStat::of(&fs::metadata(&file).unwrap());
        source.files.get_mut(&file).unwrap().stat = now;
        assert_eq!(objects(&source.scan()), ["default/x 10.96.0.9"]);
        // Once old, an unchanged identity is trusted without reading.
        let mut old = now;
        old.mtime.0 -= 10;
        old.ctime.0 -= 10;
        assert!(now.is_racy() && !old.is_racy());
    }

    #[test]
    fn a_file_rewritten_with_the_same_contents_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, svc("x", "10.96.0.1")).unwrap();
        let mut source = FileSource::new(&file);
        source.scan();
        // A new inode (an atomic rename-over), the same bytes.
        let tmp = dir.path().join("a.yaml.tmp");
        fs::write(&tmp, svc("x", "10.96.0.1")).unwrap();
        fs::rename(&tmp, &file).unwrap();
        assert_eq!(objects(&source.scan()), Vec::<String>::new());
    }
}
