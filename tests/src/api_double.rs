//! An in-process double of the Kubernetes API server, for the kube source's
//! tests (no kube-apiserver binary can be installed on these machines).
//!
//! It serves what the source's watchers ask of the real one, for Services,
//! `discovery.k8s.io/v1` EndpointSlices and Nodes: lists (one page, with a
//! `resourceVersion`, a `metadata.name` field selector) and watches from a
//! resource version — the ADDED/MODIFIED/DELETED events logged since, then
//! new ones as the test changes objects, BOOKMARKs every 200 ms, and an
//! ERROR 410 ("too old resource version") for a version older than the
//! last compaction, which makes a client re-list. The test can also drop
//! every open watch, or take the whole server down (503) and back. Objects
//! come from the same YAML the file source reads.
//!
//! Clients may also create `events.k8s.io/v1` Events, which it keeps for the
//! test to read.
//!
//! What it is not: no authentication, admission, validation, pagination,
//! protobuf, or any other resource; each request is one connection.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// How often an open watch gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_millis(200);

/// A resource the double serves: its list path and kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            "Node" => Some(Resource::Nodes),
            _ => None,
        }
    }

    fn of_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Resource::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Resource::EndpointSlices),
            "/api/v1/nodes" => Some(Resource::Nodes),
            _ => None,
        }
    }

    /// (apiVersion, kind) of its objects.
    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Resource::Services => ("v1", "Service"),
            Resource::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSlice"),
            Resource::Nodes => ("v1", "Node"),
        }
    }
}

type Key = (Resource, String, String);

#[derive(Default)]
struct State {
    /// The last resource version handed out.
    version: u64,
    objects: BTreeMap<Key, Value>,
    /// (version, resource, event type, object), oldest first.
    log: Vec<(u64, Resource, &'static str, Value)>,
    /// Watches from a version below this get 410 Gone.
    oldest_watchable: u64,
    /// Bumped to drop every open watch.
    epoch: u64,
    down: bool,
    /// Lists served, per resource.
    lists: BTreeMap<Resource, u64>,
    /// ERROR 410 answers sent.
    gone: u64,
    /// BOOKMARK events sent.
    bookmarks: u64,
    /// Requests refused while down.
    refused: u64,
    /// Events clients created or patched (`events.k8s.io/v1`), in order.
    events: Vec<Value>,
}

/// The running double; stops serving when dropped.
pub struct ApiDouble {
    state: Arc<(Mutex<State>, Condvar)>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl ApiDouble {
    /// Serves on `listener` (bound by the caller, in the network namespace
    /// the clients live in).
    pub fn serve(listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        listener.set_nonblocking(true)?;
        let (shared, stopping) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = shared.clone();
                        std::thread::spawn(move || {
                            let _ = handle(stream, &shared);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { state, addr, stop })
    }

    /// Serves on a fresh port of 127.0.0.1 in the calling thread's namespace.
    pub fn start() -> Result<Self> {
        Self::serve(TcpListener::bind("127.0.0.1:0")?)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig that points a client at this double.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: test}}\ncurrent-context: double\n",
            self.addr
        )
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (lock, wake) = &*self.state;
        let result = f(&mut lock.lock().unwrap());
        wake.notify_all();
        result
    }

    /// Makes the served objects exactly those of the Services, EndpointSlices
    /// and Nodes in `yaml` (multi-document, `kind: List` too): new ones are
    /// ADDED, changed ones MODIFIED, missing ones DELETED.
    pub fn replace_all(&self, yaml: &str) -> Result<()> {
        let mut wanted = BTreeMap::new();
        for object in objects(yaml)? {
            let resource = Resource::of_kind(object["kind"].as_str().unwrap_or_default());
            let Some(resource) = resource else { continue };
            let meta = &object["metadata"];
            let key = (
                resource,
                meta["namespace"].as_str().unwrap_or_default().to_owned(),
                meta["name"].as_str().context("metadata.name")?.to_owned(),
            );
            wanted.insert(key, object);
        }
        self.with_state(|state| {
            let gone: Vec<Key> = state
                .objects
                .keys()
                .filter(|key| !wanted.contains_key(*key))
                .cloned()
                .collect();
            for key in gone {
                let object = state.objects.remove(&key).expect("listed");
                record(state, key.0, "DELETED", object);
            }
            for (key, object) in wanted {
                let old = state.objects.get(&key).map(without_version);
                if old.as_ref() == Some(&object) {
                    continue;
                }
                let event = if old.is_some() { "MODIFIED" } else { "ADDED" };
                let object = record(state, key.0, event, object);
                state.objects.insert(key, object);
            }
        });
        Ok(())
    }

    /// Forgets the event log: a watch from an older version gets 410 Gone
    /// and its client must list again.
    pub fn compact(&self) {
        self.with_state(|state| {
            state.log.clear();
            state.oldest_watchable = state.version + 1;
        });
    }

    /// How many lists of Services were served (each watcher lists once at
    /// start and again after a 410).
    pub fn service_lists(&self) -> u64 {
        self.with_state(|state| state.lists.get(&Resource::Services).copied().unwrap_or(0))
    }

    /// The Events clients wrote, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.with_state(|state| state.events.clone())
    }

    /// How many requests were refused (503) while down.
    pub fn refused(&self) -> u64 {
        self.with_state(|state| state.refused)
    }

    /// How many BOOKMARK events were sent.
    pub fn bookmarks_sent(&self) -> u64 {
        self.with_state(|state| state.bookmarks)
    }

    /// How many watches were answered with 410 Gone.
    pub fn gone_answers(&self) -> u64 {
        self.with_state(|state| state.gone)
    }

    /// Closes every open watch connection abruptly.
    pub fn drop_watches(&self) {
        self.with_state(|state| state.epoch += 1);
    }

    /// Takes the server down (every request: 503, open watches closed) or
    /// brings it back.
    pub fn set_down(&self, down: bool) {
        self.with_state(|state| {
            state.down = down;
            state.epoch += 1;
        });
    }
}

impl Drop for ApiDouble {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.drop_watches();
    }
}

/// The objects of a multi-document YAML text, `kind: List` unpacked.
fn objects(yaml: &str) -> Result<Vec<Value>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        if value["kind"] == "List" {
            out.extend(value["items"].as_array().cloned().unwrap_or_default());
        } else {
            out.push(value);
        }
    }
    Ok(out)
}

fn without_version(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    object
}

/// Logs an event at a new version; returns the object as served.
fn record(state: &mut State, resource: Resource, event: &'static str, mut object: Value) -> Value {
    state.version += 1;
    object["metadata"]["resourceVersion"] = json!(state.version.to_string());
    state
        .log
        .push((state.version, resource, event, object.clone()));
    object
}

/// A parsed request: method, path, query parameters and body.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(stream: &TcpStream) -> Result<Request> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let method = words.next().context("method")?.to_owned();
    let target = words.next().context("request target")?;
    let mut content_length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; content_length];
    std::io::Read::read_exact(&mut reader, &mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%3d", "=")))
        .collect();
    Ok(Request {
        method,
        path: path.to_owned(),
        query,
        body,
    })
}

fn respond(mut stream: &TcpStream, status: &str, body: &Value) -> Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn chunk(mut stream: &TcpStream, line: &Value) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(stream, "{:x}\r\n{data}\r\n", data.len())?;
    stream.flush()
}

fn handle(stream: TcpStream, shared: &(Mutex<State>, Condvar)) -> Result<()> {
    stream.set_nonblocking(false)?;
    let request = read_request(&stream)?;
    let (lock, wake) = shared;
    if lock.lock().unwrap().down {
        lock.lock().unwrap().refused += 1;
        return respond(
            &stream,
            "503 Service Unavailable",
            &status(503, "ServiceUnavailable", "down"),
        );
    }
    if request.method != "GET" {
        if request.path.starts_with("/apis/events.k8s.io/v1/") {
            let event: Value = serde_json::from_slice(&request.body)?;
            lock.lock().unwrap().events.push(event.clone());
            return respond(&stream, "201 Created", &event);
        }
        return respond(
            &stream,
            "405 Method Not Allowed",
            &status(405, "MethodNotAllowed", "read-only"),
        );
    }
    let Some(resource) = Resource::of_path(&request.path) else {
        return respond(
            &stream,
            "404 Not Found",
            &status(404, "NotFound", "no such path"),
        );
    };
    let name_selector = request
        .query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned);
    let selected = |object: &Value| {
        name_selector
            .as_deref()
            .is_none_or(|name| object["metadata"]["name"] == name)
    };
    let (api_version, kind) = resource.type_meta();
    if request.query.get("watch").map(String::as_str) != Some("true") {
        let mut state = lock.lock().unwrap();
        *state.lists.entry(resource).or_default() += 1;
        let items: Vec<&Value> = state
            .objects
            .iter()
            .filter(|((r, _, _), o)| *r == resource && selected(o))
            .map(|(_, o)| o)
            .collect();
        let list = json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                          "metadata": {"resourceVersion": state.version.to_string()},
                          "items": items});
        drop(state);
        return respond(&stream, "200 OK", &list);
    }
    let mut since: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let bookmarks = request.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    write!(
        &stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut state = lock.lock().unwrap();
    if since < state.oldest_watchable {
        state.gone += 1;
        drop(state);
        let gone = status(410, "Expired", "too old resource version");
        chunk(&stream, &json!({"type": "ERROR", "object": gone}))?;
        write!(&stream, "0\r\n\r\n")?;
        return Ok(());
    }
    let epoch = state.epoch;
    let started = Instant::now();
    let mut last_bookmark = Instant::now();
    loop {
        if state.epoch != epoch {
            // Dropped: close without ending the chunked body.
            return Ok(());
        }
        let news: Vec<Value> = state
            .log
            .iter()
            .filter(|(v, r, _, o)| *v > since && *r == resource && selected(o))
            .map(|(_, _, event, object)| json!({"type": event, "object": object}))
            .collect();
        since = state.version;
        drop(state);
        for event in news {
            chunk(&stream, &event)?;
        }
        if bookmarks && last_bookmark.elapsed() >= BOOKMARK_EVERY {
            let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version,
                "kind": kind, "metadata": {"resourceVersion": since.to_string()}}});
            chunk(&stream, &bookmark)?;
            lock.lock().unwrap().bookmarks += 1;
            last_bookmark = Instant::now();
        }
        if started.elapsed() >= timeout {
            write!(&stream, "0\r\n\r\n")?;
            return Ok(());
        }
        state = wake
            .wait_timeout(lock.lock().unwrap(), BOOKMARK_EVERY)
            .map(|(guard, _)| guard)
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        if state.down {
            bail!("down");
        }
    }
}
