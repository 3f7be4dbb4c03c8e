//! The file source: multi-document Kubernetes YAML (Services,
//! `discovery.k8s.io/v1` EndpointSlices, `v1` Endpoints and Nodes, also
//! inside `kind: List` as
//! `kubectl get -o yaml` prints several objects) from a file or a directory,
//! read incrementally ([`FileSource`]) or at once ([`read`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::OsString,
    fmt, fs,
    hash::{Hash, Hasher},
    os::fd::AsRawFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use inotify::{EventMask, Inotify, WatchMask};
use serde_yaml_ng::Value;

use super::{Change, Snapshot};
use crate::{
    model::{
        self, ObjectName,
        manifest::{EndpointSlice, Endpoints, Node, Service},
    },
    problem::{Invalid, Problem},
};

/// The manifest files under `path`: the file itself, or the `*.yaml`,
/// `*.yml` and `*.json` files of a directory (not recursive), sorted; an
/// error when `path` is not there.
pub fn manifest_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !fs::metadata(path)?.is_dir() {
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
pub struct FileSource {
    path: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// The path of each file id.
    paths: HashMap<FileId, PathBuf>,
    next_id: FileId,
    /// The files that define each object (nearly always one).
    defined_in: HashMap<ObjectKey, Definers>,
    /// Change notification; without it (the path does not exist yet, or
    /// went), every scan looks at every file.
    watcher: Option<Inotify>,
    /// The directory `watcher` watches.
    watched: Option<PathBuf>,
    /// Something changed since the last scan (or may have: the event queue
    /// overflowed).
    dirty: bool,
    /// The files events named since the last scan: a recent one among them
    /// is read again even when its identity looks unchanged (rewritten
    /// within one timestamp tick); the others are trusted.
    written: HashSet<OsString>,
    overflowed: bool,
    /// What listing the path last found wrong (`None`: not listed yet).
    listing_problems: Option<Vec<Problem>>,
    last_scan: Option<Instant>,
}

/// With change notification, the files are looked at anyway this often.
const RESCAN: Duration = Duration::from_secs(10);

/// An object, by kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ObjectKey {
    Service(ObjectName),
    Slice(ObjectName),
    Endpoints(ObjectName),
    Node(String),
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Service(name) => write!(f, "Service {name}"),
            ObjectKey::Slice(name) => write!(f, "EndpointSlice {name}"),
            ObjectKey::Endpoints(name) => write!(f, "Endpoints {name}"),
            ObjectKey::Node(name) => write!(f, "Node {name}"),
        }
    }
}

/// A manifest file, as the source knows it by: an id of its own (cheaper
/// than its path in every object's entry).
type FileId = u32;

/// The files that define one object: nearly always one, kept inline.
#[derive(Debug)]
enum Definers {
    One(FileId),
    Many(Vec<FileId>),
}

impl Definers {
    fn len(&self) -> usize {
        match self {
            Definers::One(_) => 1,
            Definers::Many(files) => files.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &FileId> {
        match self {
            Definers::One(file) => std::slice::from_ref(file).iter(),
            Definers::Many(files) => files.iter(),
        }
    }

    fn insert(&mut self, id: FileId) {
        match self {
            Definers::One(file) if *file == id => {}
            Definers::One(file) => *self = Definers::Many(vec![*file, id]),
            Definers::Many(files) if files.contains(&id) => {}
            Definers::Many(files) => files.push(id),
        }
    }

    /// Takes `id` out; whether none is left.
    fn remove(&mut self, id: FileId) -> bool {
        match self {
            Definers::One(file) => *file == id,
            Definers::Many(files) => {
                files.retain(|f| *f != id);
                match files[..] {
                    [] => true,
                    [one] => {
                        *self = Definers::One(one);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

#[derive(Debug)]
struct CachedFile {
    id: FileId,
    stat: FileStat,
    hash: u64,
    /// The objects it defines, sorted.
    keys: Vec<ObjectKey>,
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
#[derive(Default)]
struct ParsedFile {
    objects: BTreeMap<ObjectKey, Change>,
    problems: Vec<Problem>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let watched = watched_dir(&path);
        Self {
            watcher: watched.as_deref().and_then(watch),
            watched,
            path,
            files: BTreeMap::new(),
            paths: HashMap::new(),
            next_id: 0,
            defined_in: HashMap::new(),
            dirty: true,
            written: HashSet::new(),
            overflowed: false,
            listing_problems: None,
            last_scan: None,
        }
    }

    /// Waits up to `timeout` for the manifests to change; returns at once
    /// when they do.
    pub fn wait(&mut self, timeout: Duration) {
        let Some(inotify) = &mut self.watcher else {
            std::thread::sleep(timeout);
            return;
        };
        let mut poll = libc::pollfd {
            fd: inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as i32) };
        self.drain();
    }

    /// Takes in the change events that came, without waiting.
    fn drain(&mut self) {
        let Some(inotify) = &mut self.watcher else {
            return;
        };
        let mut buffer = [0u8; 4096];
        let mut lost = false;
        while let Ok(events) = inotify.read_events(&mut buffer) {
            let mut any = false;
            for event in events {
                any = true;
                self.dirty = true;
                match event.name {
                    Some(name) => {
                        self.written.insert(name.to_owned());
                    }
                    // The event queue overflowed: any file may have changed.
                    None => self.overflowed = true,
                }
                // The watched directory itself went: the next scan watches
                // what is there then.
                lost |= event
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED);
            }
            if !any {
                break;
            }
        }
        if lost {
            self.watcher = None;
            self.watched = None;
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What changed since the last scan (the first returns everything).
    /// With change notification, only when something changed (or
    /// [`RESCAN`] passed).
    pub fn scan(&mut self) -> Vec<Change> {
        // The directory to watch may have come, gone or changed (the path
        // created, or removed and created again, since the last scan).
        let dir = watched_dir(&self.path);
        if dir != self.watched {
            self.watcher = dir.as_deref().and_then(watch);
            self.watched = dir.filter(|_| self.watcher.is_some());
            self.dirty = true;
        }
        self.drain();
        if self.watcher.is_some()
            && !self.dirty
            && self.last_scan.is_some_and(|at| at.elapsed() < RESCAN)
        {
            return Vec::new();
        }
        self.dirty = false;
        self.last_scan = Some(Instant::now());
        let written = std::mem::take(&mut self.written);
        let overflowed = std::mem::take(&mut self.overflowed);
        let mut changes = Vec::new();
        // What cannot be listed (gone, unreadable) keeps what it defined:
        // the last good state is served through an error, as the kube
        // source does.
        let (listed, listing_problems) = match manifest_files(&self.path) {
            Ok(files) => (Some(files), Vec::new()),
            Err(err) => {
                let problem = Problem::new(self.origin(), Invalid::Parse(err.to_string()));
                (None, vec![problem])
            }
        };
        // Told when it changes only: a scan that finds nothing new says
        // nothing.
        if self.listing_problems.as_ref() != Some(&listing_problems) {
            changes.push(Change::Problems(self.origin(), listing_problems.clone()));
            self.listing_problems = Some(listing_problems);
        }
        let Some(listed) = listed else {
            return changes;
        };
        // Files whose contents changed (parsed), or that went (`None`).
        let mut changed: BTreeMap<PathBuf, Option<(FileStat, u64, ParsedFile)>> = BTreeMap::new();
        for file in &listed {
            // Without events to go by, every recent file may have changed
            // within its timestamp tick.
            let recheck = self.watcher.is_none()
                || overflowed
                || file.file_name().is_some_and(|name| written.contains(name));
            let Some((stat, read)) = stat_and_read(file, self.files.get(file), recheck) else {
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
                // Gone since the listing: the next scan sees it gone.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                // Unreadable: what it defined stays, and it is read again
                // at the next scan.
                Err(err) => {
                    let problem = Problem::new(origin(file), Invalid::Parse(err.to_string()));
                    changes.push(Change::Problems(origin(file), vec![problem]));
                    if let Some(cached) = cached {
                        cached.stat = FileStat::default();
                    }
                    continue;
                }
            };
            changed.insert(file.clone(), Some((stat, hash, parsed)));
        }
        let listed: HashSet<&PathBuf> = listed.iter().collect();
        for file in self.files.keys() {
            if !listed.contains(file) {
                changed.insert(file.clone(), None);
            }
        }
        // Who defined each touched object before (and whether twice), and
        // who does now.
        let mut touched: BTreeMap<ObjectKey, (Option<FileId>, bool)> = BTreeMap::new();
        let mut new_keys_of: BTreeMap<PathBuf, (FileId, Vec<ObjectKey>)> = BTreeMap::new();
        for (file, new) in &changed {
            let id = self.file_id(file);
            let old_keys = self
                .files
                .get_mut(file)
                .map(|c| std::mem::take(&mut c.keys))
                .unwrap_or_default();
            let new_keys: Vec<ObjectKey> = new
                .as_ref()
                .map(|(_, _, parsed)| parsed.objects.keys().cloned().collect())
                .unwrap_or_default();
            for key in old_keys.iter().chain(&new_keys) {
                if !touched.contains_key(key) {
                    let twice = self.defined_in.get(key).is_some_and(|f| f.len() > 1);
                    touched.insert(key.clone(), (self.winner(key), twice));
                }
            }
            for key in old_keys {
                if new_keys.binary_search(&key).is_err()
                    && let Some(files) = self.defined_in.get_mut(&key)
                    && files.remove(id)
                {
                    self.defined_in.remove(&key);
                }
            }
            for key in &new_keys {
                match self.defined_in.get_mut(key) {
                    Some(files) => files.insert(id),
                    None => {
                        self.defined_in.insert(key.clone(), Definers::One(id));
                    }
                }
            }
            new_keys_of.insert(file.clone(), (id, new_keys));
        }
        // Files whose definitions take over while they did not change: each
        // read again once.
        let mut reparsed: HashMap<FileId, ParsedFile> = HashMap::new();
        for (key, (before, was_twice)) in touched {
            let now = self.winner(&key);
            let duplicates = self.duplicates(&key);
            if was_twice || !duplicates.is_empty() {
                changes.push(Change::Problems(format!("{key} defined twice"), duplicates));
            }
            let object = match now {
                None => Some(deleted(&key)),
                Some(id) => {
                    let file = &self.paths[&id];
                    match changed.get_mut(file) {
                        // Its file changed: its object as parsed now.
                        Some(new) => new
                            .as_mut()
                            .and_then(|(_, _, parsed)| parsed.objects.remove(&key)),
                        // Another file's definition takes over: read it again.
                        None if before != now => reparsed
                            .entry(id)
                            .or_insert_with(|| reparse(file))
                            .objects
                            .remove(&key),
                        None => None,
                    }
                }
            };
            changes.extend(object);
        }
        for (file, new) in changed {
            let (id, keys) = new_keys_of.remove(&file).unwrap_or_default();
            match new {
                Some((stat, hash, parsed)) => {
                    changes.push(Change::Problems(origin(&file), parsed.problems));
                    let cached = CachedFile {
                        id,
                        stat,
                        hash,
                        keys,
                    };
                    self.files.insert(file, cached);
                }
                None => {
                    changes.push(Change::Problems(origin(&file), Vec::new()));
                    self.files.remove(&file);
                    self.paths.remove(&id);
                }
            }
        }
        changes
    }

    /// The id of `file`, known or new.
    fn file_id(&mut self, file: &Path) -> FileId {
        if let Some(cached) = self.files.get(file) {
            return cached.id;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.paths.insert(id, file.to_owned());
        id
    }

    fn origin(&self) -> String {
        origin(&self.path)
    }

    /// The file whose definition of `key` is used: the first by path.
    fn winner(&self, key: &ObjectKey) -> Option<FileId> {
        let files = self.defined_in.get(key)?;
        files.iter().copied().min_by_key(|id| &self.paths[id])
    }

    /// The problems of `key` being defined in more than one file.
    fn duplicates(&self, key: &ObjectKey) -> Vec<Problem> {
        let Some(files) = self.defined_in.get(key).filter(|f| f.len() > 1) else {
            return Vec::new();
        };
        let mut files: Vec<&PathBuf> = files.iter().map(|id| &self.paths[id]).collect();
        files.sort();
        let mut files = files.into_iter();
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

/// The directory to watch for `path`: itself, or the directory of the
/// file (a file replaced by a rename is an event there).
fn watched_dir(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        return Some(path.to_owned());
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    parent.is_dir().then(|| parent.to_owned())
}

/// Change notification for directory `dir`.
fn watch(dir: &Path) -> Option<Inotify> {
    let inotify = Inotify::init().ok()?;
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    inotify.watches().add(dir, mask).ok()?;
    Some(inotify)
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
    recheck_recent: bool,
) -> Option<(FileStat, std::io::Result<Vec<u8>>)> {
    let stat = match fs::metadata(file) {
        Ok(meta) => FileStat::of(&meta),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => return Some((FileStat::default(), Err(err))),
    };
    if cached.is_some_and(|c| c.stat == stat && !(recheck_recent && stat.is_racy())) {
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
        ObjectKey::Endpoints(name) => Change::Endpoints(name.clone(), None),
        ObjectKey::Node(name) => Change::Node(name.clone(), None),
    }
}

/// `file`'s objects as it defines them now.
fn reparse(file: &Path) -> ParsedFile {
    let text = fs::read_to_string(file).unwrap_or_default();
    parse_file(file, &text)
}

/// The objects of one file, parsed into the form the model keeps (each
/// document's API object dropped as soon as it is converted).
fn parse_file(file: &Path, text: &str) -> ParsedFile {
    let parts = parse_documents(
        &origin(file),
        text,
        |name, document, part: &mut ParsedFile| {
            let mut snapshot = Snapshot::default();
            parse_document(name, document, &mut snapshot);
            part.add(snapshot);
        },
    );
    let mut parsed = ParsedFile::default();
    for part in parts {
        parsed.objects.extend(part.objects);
        parsed.problems.extend(part.problems);
    }
    parsed
}

impl ParsedFile {
    fn add(&mut self, snapshot: Snapshot) {
        for service in &snapshot.services {
            let (name, object) = model::parse_service(service);
            self.objects.insert(
                ObjectKey::Service(name.clone()),
                Change::Service(name, Some(object)),
            );
        }
        for slice in &snapshot.endpoint_slices {
            let (name, object) = model::parse_slice(slice);
            self.objects.insert(
                ObjectKey::Slice(name.clone()),
                Change::Slice(name, Some(object)),
            );
        }
        for endpoints in &snapshot.endpoints {
            let (name, object) = model::parse_endpoints(endpoints);
            self.objects.insert(
                ObjectKey::Endpoints(name.clone()),
                Change::Endpoints(name, Some(object)),
            );
        }
        for node in &snapshot.nodes {
            let node = model::Node::from_manifest(node);
            self.objects.insert(
                ObjectKey::Node(node.name.clone()),
                Change::Node(node.name.clone(), Some(node)),
            );
        }
        self.problems.extend(snapshot.problems);
    }
}

/// Parses the YAML documents of one file (named `origin` in problems).
pub fn parse_into(origin: &str, text: &str, snapshot: &mut Snapshot) {
    for part in parse_documents(origin, text, |name, document, part: &mut Snapshot| {
        parse_document(name, document, part)
    }) {
        snapshot.services.extend(part.services);
        snapshot.endpoint_slices.extend(part.endpoint_slices);
        snapshot.endpoints.extend(part.endpoints);
        snapshot.nodes.extend(part.nodes);
        snapshot.problems.extend(part.problems);
    }
}

/// Runs `parse` on every document of `text` (with the name problems give
/// it), into one `T` per run of documents, in order. Documents are
/// independent: a large file is parsed on every core.
fn parse_documents<T: Default + Send>(
    origin: &str,
    text: &str,
    parse: impl Fn(&str, &str, &mut T) + Sync,
) -> Vec<T> {
    let documents = documents(text);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = documents.len().div_ceil(workers).max(PARALLEL_FROM);
    let parse = &parse;
    let run = |first: usize, docs: &[&str]| {
        let mut part = T::default();
        for (offset, document) in docs.iter().enumerate() {
            let name = format!("{origin} document {}", first + offset + 1);
            parse(&name, document, &mut part);
        }
        part
    };
    if documents.len() <= chunk {
        // One run: no thread to start.
        return vec![run(0, &documents)];
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = documents
            .chunks(chunk)
            .enumerate()
            .map(|(i, docs)| scope.spawn(move || run(i * chunk, docs)))
            .collect();
        handles
            .into_iter()
            // A parser that panicked must not pass for a file without objects.
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Below this many documents a file is parsed on one thread.
const PARALLEL_FROM: usize = 256;

/// One document: straight into its type when its top-level `apiVersion`
/// and `kind` say which (no generic YAML tree); through a tree otherwise
/// (a `List`, JSON, a layout the quick look does not read).
fn parse_document(name: &str, document: &str, snapshot: &mut Snapshot) {
    let typed = match top_level_kind(document) {
        Some(("v1", "Service")) => {
            serde_yaml_ng::from_str(document).map(|service| snapshot.services.push(service))
        }
        Some(("discovery.k8s.io/v1", "EndpointSlice")) => {
            serde_yaml_ng::from_str(document).map(|slice| snapshot.endpoint_slices.push(slice))
        }
        Some(("v1", "Endpoints")) => {
            serde_yaml_ng::from_str(document).map(|endpoints| snapshot.endpoints.push(endpoints))
        }
        Some(("v1", "Node")) => {
            serde_yaml_ng::from_str(document).map(|node| snapshot.nodes.push(node))
        }
        Some((_, "List")) | None => {
            match serde_yaml_ng::from_str::<Value>(document) {
                Ok(Value::Null) => {}
                Ok(value) => add_object(name, value, snapshot),
                Err(err) => snapshot
                    .problems
                    .push(Problem::new(name, Invalid::Parse(err.to_string()))),
            }
            return;
        }
        // Other kinds (Deployments, Pods …) may share the files; not ours.
        Some(_) => return,
    };
    if let Err(err) = typed {
        let kind = top_level_kind(document).map_or("", |(_, kind)| kind);
        let object = format!("{name} ({kind})");
        snapshot
            .problems
            .push(Problem::new(object, Invalid::Parse(err.to_string())));
    }
}

/// The `apiVersion` and `kind` of a block-style document, read from its
/// unindented lines; `None` when either is not there.
fn top_level_kind(document: &str) -> Option<(&str, &str)> {
    fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let rest = rest.split(" #").next().unwrap_or(rest).trim();
        let unquoted = rest
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .or_else(|| rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
            .unwrap_or(rest);
        (!unquoted.is_empty()).then_some(unquoted)
    }
    let (mut api_version, mut kind) = (None, None);
    for line in document.lines() {
        api_version = api_version.or_else(|| value(line, "apiVersion"));
        kind = kind.or_else(|| value(line, "kind"));
        if let (Some(api_version), Some(kind)) = (api_version, kind) {
            return Some((api_version, kind));
        }
    }
    None
}

/// Splits a YAML stream at its `---` lines. Done here rather than by the
/// YAML parser, which stops at the first broken document: one bad document
/// must not hide the ones after it.
fn documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            documents.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push(&text[start..]);
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
        ("v1", "Endpoints") => serde_yaml_ng::from_value::<Endpoints>(value)
            .map(|endpoints| snapshot.endpoints.push(endpoints)),
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
                Change::Endpoints(name, _) => Some(format!("endpoints {name}")),
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
        assert_eq!(source.scan(), vec![], "nothing changed, nothing said");
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

    #[test]
    fn a_change_wakes_the_wait_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = FileSource::new(dir.path());
        assert!(source.watcher.is_some(), "inotify on the directory");
        source.scan();
        let writer = {
            let file = dir.path().join("a.yaml");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                fs::write(file, svc("x", "10.96.0.1")).unwrap();
            })
        };
        let started = Instant::now();
        source.wait(Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "woken by the change"
        );
        writer.join().unwrap();
        // The write may come as several events: wait for them all.
        source.wait(Duration::from_millis(100));
        assert_eq!(objects(&source.scan()), ["default/x 10.96.0.1"]);
        // Nothing since: the scan looks at nothing.
        assert!(!source.dirty);
        assert_eq!(objects(&source.scan()), Vec::<String>::new());
    }

    #[test]
    fn an_unreadable_file_or_directory_keeps_what_it_defined() {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        fs::create_dir(&manifests).unwrap();
        let a = manifests.join("a.yaml");
        fs::write(&a, svc("x", "10.96.0.1")).unwrap();
        let mut source = FileSource::new(&manifests);
        assert_eq!(objects(&source.scan()), ["default/x 10.96.0.1"]);
        // a.yaml cannot be read (a directory now): x stays, told once.
        fs::remove_file(&a).unwrap();
        fs::create_dir(&a).unwrap();
        let changes = source.scan();
        assert_eq!(objects(&changes), Vec::<String>::new());
        assert_eq!(problems(&changes).len(), 1, "{changes:?}");
        // Readable again: the file is read again.
        fs::remove_dir(&a).unwrap();
        fs::write(&a, svc("x", "10.96.0.2")).unwrap();
        assert_eq!(objects(&source.scan()), ["default/x 10.96.0.2"]);
        // The directory goes: nothing is deleted, the listing is a
        // problem; back, it is watched and read again.
        fs::remove_dir_all(&manifests).unwrap();
        let changes = source.scan();
        assert_eq!(objects(&changes), Vec::<String>::new());
        assert_eq!(problems(&changes).len(), 1, "{changes:?}");
        fs::create_dir(&manifests).unwrap();
        fs::write(&a, svc("x", "10.96.0.3")).unwrap();
        assert_eq!(objects(&source.scan()), ["default/x 10.96.0.3"]);
        assert!(source.watcher.is_some(), "the new directory is watched");
    }
}
