//! A fake Kubernetes API server: the real HTTP list + watch protocol (resourceVersion, chunked
//! watch streams, bookmarks, `410 Gone`), enough for the real kube-rs client in the agent. No
//! real kube-apiserver can be installed here; this is the one stand-in the project allows.
//!
//! Serves Services, EndpointSlices and Nodes (with `fieldSelector=metadata.name=...`). Tests
//! change objects, drop watches, expire resource versions, and take the server down and up.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

use crate::lab::Netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }

    fn of(object: &Value) -> Option<Self> {
        match object["kind"].as_str()? {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (kind, namespace, name) -> object (with its resourceVersion set).
    objects: BTreeMap<(Kind, String, String), Value>,
    events: Vec<Event>,
    /// Watches from before this resource version get `410 Gone`.
    oldest_rv: u64,
    down: bool,
    /// Requests served, by "list" / "watch", for tests that count relists.
    lists: u64,
    watches: u64,
}

/// Broadcast to open watch streams: a new event, or "close now".
#[derive(Clone, Debug)]
enum Notice {
    Event(Event),
    Drop,
}

/// The server; stopped on drop.
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    notices: broadcast::Sender<Notice>,
    pub port: u16,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

fn key_of(kind: Kind, object: &Value) -> (Kind, String, String) {
    let meta = &object["metadata"];
    (
        kind,
        meta["namespace"].as_str().unwrap_or("").to_string(),
        meta["name"].as_str().unwrap_or("").to_string(),
    )
}

impl FakeApi {
    /// Starts the server on 127.0.0.1 of `ns` (so an agent in that namespace reaches it).
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            rv: 1000,
            ..State::default()
        }));
        let (notices, _) = broadcast::channel(1024);
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let ns = ns.clone();
        let thread_state = state.clone();
        let thread_notices = notices.clone();
        let thread = thread::spawn(move || {
            let run = || -> anyhow::Result<()> {
                ns.enter_current_thread()?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await?;
                    let _ = port_tx.send(listener.local_addr()?.port());
                    tokio::pin!(shutdown_rx);
                    loop {
                        tokio::select! {
                            _ = &mut shutdown_rx => return anyhow::Ok(()),
                            accepted = listener.accept() => {
                                let (stream, _) = accepted?;
                                let state = thread_state.clone();
                                let notices = thread_notices.clone();
                                tokio::spawn(async move {
                                    let _ = serve(stream, state, notices).await;
                                });
                            }
                        }
                    }
                })
            };
            if let Err(err) = run() {
                eprintln!("fake API server: {err:#}");
            }
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(5))
            .context("fake API server did not start")?;
        Ok(Self {
            state,
            notices,
            port,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{}\"}}}}]
users: [{{name: fake, user: {{}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]
current-context: fake
",
            self.port
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object (JSON with apiVersion, kind, metadata).
    pub fn apply(&self, mut object: Value) {
        let kind = Kind::of(&object).expect("Service, EndpointSlice or Node");
        let event = {
            let mut state = self.lock();
            state.rv += 1;
            let rv = state.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let key = key_of(kind, &object);
            let type_ = if state.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            state.objects.insert(key, object.clone());
            let event = Event {
                rv,
                kind,
                type_,
                object,
            };
            state.events.push(event.clone());
            event
        };
        let _ = self.notices.send(Notice::Event(event));
    }

    /// Applies every document of a YAML stream.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        for document in yaml.split("\n---") {
            if document.trim().is_empty() {
                continue;
            }
            let value: Value = serde_yaml_to_json(document)?;
            self.apply(value);
        }
        Ok(())
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let event = {
            let mut state = self.lock();
            let Some(mut object) =
                state
                    .objects
                    .remove(&(kind, namespace.to_string(), name.to_string()))
            else {
                return;
            };
            state.rv += 1;
            let rv = state.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let event = Event {
                rv,
                kind,
                type_: "DELETED",
                object,
            };
            state.events.push(event.clone());
            event
        };
        let _ = self.notices.send(Notice::Event(event));
    }

    /// Closes every open watch (clients resume from their last resource version).
    pub fn drop_watches(&self) {
        let _ = self.notices.send(Notice::Drop);
    }

    /// Forgets history: resuming a watch from before now gets `410 Gone` (clients relist).
    pub fn expire_history(&self) {
        let mut state = self.lock();
        // As a compaction after more writes: every version a client has seen (bookmarks
        // included) is now too old, while the version a relist returns stays valid.
        state.rv += 1;
        state.oldest_rv = state.rv;
        state.events.clear();
    }

    /// An outage: every connection is refused (closed at once) until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
        if down {
            self.drop_watches();
        }
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (u64, u64) {
        let state = self.lock();
        (state.lists, state.watches)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.drop_watches();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serde_yaml_to_json(document: &str) -> anyhow::Result<Value> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(document).with_context(|| format!("YAML document {document:?}"))?;
    Ok(serde_json::to_value(value)?)
}

/// One connection: requests until the client closes it, or a watch that runs until dropped.
async fn serve(
    mut stream: TcpStream,
    state: Arc<Mutex<State>>,
    notices: broadcast::Sender<Notice>,
) -> anyhow::Result<()> {
    let mut buffer = Vec::new();
    loop {
        if state.lock().map(|s| s.down).unwrap_or(true) {
            return Ok(()); // outage: hang up
        }
        // Read one request head.
        let head = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).to_string();
                buffer.drain(..end + 4);
                break head;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        let target = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/")
            .to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        let Some(kind) = Kind::from_path(path) else {
            respond(
                &mut stream,
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
            )
            .await?;
            continue;
        };
        let name_filter = params
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="))
            .map(str::to_string);
        let matches = |k: Kind, object: &Value| {
            k == kind
                && name_filter
                    .as_deref()
                    .is_none_or(|n| object["metadata"]["name"].as_str() == Some(n))
        };
        if params.get("watch").map(String::as_str) == Some("true") {
            let since: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return watch(stream, &state, &notices, kind, since, &matches).await;
        }
        let body = {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.lists += 1;
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((k, _, _), o)| matches(*k, o))
                .map(|(_, o)| o.clone())
                .collect();
            json!({
                "apiVersion": kind.api_version(),
                "kind": kind.list_kind(),
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items,
            })
        };
        respond(&mut stream, 200, &body).await?;
    }
}

async fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> anyhow::Result<()> {
    let body = serde_json::to_vec(body)?;
    let reason = if code == 200 { "OK" } else { "Not Found" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    Ok(())
}

async fn chunk(stream: &mut TcpStream, line: &Value) -> anyhow::Result<()> {
    let mut data = serde_json::to_vec(line)?;
    data.push(b'\n');
    stream
        .write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    stream.write_all(&data).await?;
    stream.write_all(b"\r\n").await?;
    Ok(())
}

async fn watch(
    mut stream: TcpStream,
    state: &Arc<Mutex<State>>,
    notices: &broadcast::Sender<Notice>,
    kind: Kind,
    since: u64,
    matches: &impl Fn(Kind, &Value) -> bool,
) -> anyhow::Result<()> {
    let mut receiver = notices.subscribe();
    let (backlog, gone) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.watches += 1;
        let gone = since < s.oldest_rv;
        let backlog: Vec<Event> = s
            .events
            .iter()
            .filter(|e| e.rv > since && matches(e.kind, &e.object))
            .cloned()
            .collect();
        (backlog, gone)
    };
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await?;
    if gone {
        let status = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        chunk(&mut stream, &status).await?;
        stream.write_all(b"0\r\n\r\n").await?;
        return Ok(());
    }
    let mut last_rv = since;
    for event in backlog {
        last_rv = last_rv.max(event.rv);
        chunk(
            &mut stream,
            &json!({"type": event.type_, "object": event.object}),
        )
        .await?;
    }
    let mut bookmark = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            notice = receiver.recv() => match notice {
                Ok(Notice::Event(event)) if event.rv > last_rv && matches(event.kind, &event.object) => {
                    last_rv = event.rv;
                    chunk(&mut stream, &json!({"type": event.type_, "object": event.object})).await?;
                }
                Ok(Notice::Event(_)) => {}
                Ok(Notice::Drop) | Err(_) => return Ok(()), // hang up mid-stream
            },
            _ = bookmark.tick() => {
                // A bookmark carries only a resource version, no object change.
                let rv = state.lock().map(|s| s.rv).unwrap_or(last_rv);
                let object = json!({"kind": match kind { Kind::Service => "Service", Kind::EndpointSlice => "EndpointSlice", Kind::Node => "Node" },
                    "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                chunk(&mut stream, &json!({"type": "BOOKMARK", "object": object})).await?;
            }
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
