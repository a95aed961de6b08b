//! The Kubernetes source: kube-rs watchers on Services, EndpointSlices and this agent's own
//! Node, each kept in a reflector store.
//!
//! The reflector swaps a relisted store in whole once the new list is complete, so a dropped
//! watch or a `410 Gone` never empties the state in between: nothing is deleted until a fresh
//! list proves it gone.

use std::{path::Path, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, Config,
};
use tracing::warn;

/// How the agent reaches the API server.
#[derive(Clone, Debug)]
pub struct ClientOptions<'a> {
    /// A kubeconfig file; otherwise `$KUBECONFIG`, `~/.kube/config` or the in-cluster
    /// service account, as kube-rs infers.
    pub kubeconfig: Option<&'a Path>,
    /// Client-side rate limit: sustained requests per second, and how many may go at once.
    pub qps: f32,
    pub burst: u32,
}

pub async fn client(options: &ClientOptions<'_>) -> anyhow::Result<Client> {
    let config = match options.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("finding the API server (in-cluster, $KUBECONFIG or ~/.kube/config)")?,
    };
    // A window of `burst` requests every `burst / qps` seconds: `qps` on average, bursts of
    // `burst` (what kube-proxy's --kube-api-qps / --kube-api-burst bound).
    let burst = options.burst.max(1);
    let qps = f64::from(options.qps);
    anyhow::ensure!(
        qps.is_finite() && (0.001..=100_000.0).contains(&qps),
        "--kube-api-qps {qps} is outside 0.001-100000"
    );
    let window = Duration::try_from_secs_f64(f64::from(burst) / qps)
        .ok()
        .filter(|w| !w.is_zero())
        .with_context(|| format!("--kube-api-burst {burst} with --kube-api-qps {qps}"))?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("building the API client")?
        .with_layer(&tower::limit::RateLimitLayer::new(u64::from(burst), window))
        .build();
    Ok(client)
}

/// The three stores, filled by [`watch`].
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
}

/// What a watch stream reports to the agent's loop. Objects are read from the stores, which
/// the reflector has updated by the time the signal arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// This Service (`namespace/name`) was created, changed or deleted.
    Service(String),
    /// This EndpointSlice (`namespace/name`) was created, changed or deleted.
    Slice(String),
    /// The agent's Node changed.
    Node,
    /// A complete list replaced this resource's store (start, or relist after `410 Gone`).
    Relisted(&'static str),
    /// A watch (of this resource) failed and is being retried with backoff (the stores keep
    /// their contents).
    Restarted(&'static str),
}

pub type Signals = Pin<Box<dyn Stream<Item = Signal> + Send>>;

/// Starts the watchers; the returned stream must be polled for the stores to fill.
pub fn watch(client: Client, node_name: &str) -> (Stores, Signals) {
    let (services, services_writer) = reflector::store();
    let (endpoint_slices, slices_writer) = reflector::store();
    let (nodes, nodes_writer) = reflector::store();
    let config = watcher::Config::default();
    let services_stream = signals(
        "services",
        |s: &Service| Signal::Service(crate::model::namespaced(&s.metadata)),
        reflector::reflector(
            services_writer,
            watcher(Api::<Service>::all(client.clone()), config.clone()),
        ),
    );
    let slices_stream = signals(
        "endpointslices",
        |s: &EndpointSlice| Signal::Slice(crate::model::namespaced(&s.metadata)),
        reflector::reflector(
            slices_writer,
            watcher(Api::<EndpointSlice>::all(client.clone()), config.clone()),
        ),
    );
    let nodes_stream = signals(
        "nodes",
        |_: &Node| Signal::Node,
        reflector::reflector(
            nodes_writer,
            watcher(
                Api::<Node>::all(client),
                config.fields(&format!("metadata.name={node_name}")),
            ),
        ),
    );
    let merged = futures::stream::select_all([services_stream, slices_stream, nodes_stream]);
    (
        Stores {
            services,
            endpoint_slices,
            nodes,
        },
        Box::pin(merged),
    )
}

/// Retry delays of a failed watch: exponential from 800 ms with jitter, as client-go's and
/// kube-rs's defaults, but capped at 10 s instead of 30 s. After an outage a watch meets two
/// failures in a row (the reconnect, then `410 Gone`), and with a 30 s cap the agent caught up
/// about a minute after the API server returned; a node's datapath should lag less.
fn backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(800))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

fn signals<K, S>(resource: &'static str, changed: fn(&K) -> Signal, stream: S) -> Signals
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    use watcher::Event;
    Box::pin(stream.backoff(backoff()).filter_map(move |event| {
        futures::future::ready(match event {
            Ok(Event::Apply(object) | Event::Delete(object)) => Some(changed(&object)),
            // A relist is buffered by the reflector and swapped in at its end.
            Ok(Event::Init | Event::InitApply(_)) => None,
            Ok(Event::InitDone) => Some(Signal::Relisted(resource)),
            Err(err) => {
                warn!(resource, "watch failed, retrying (state kept): {err}");
                Some(Signal::Restarted(resource))
            }
        })
    }))
}

impl Stores {
    /// Waits until every store has its first complete list.
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        self.services
            .wait_until_ready()
            .await
            .context("Service watch ended")?;
        self.endpoint_slices
            .wait_until_ready()
            .await
            .context("EndpointSlice watch ended")?;
        self.nodes
            .wait_until_ready()
            .await
            .context("Node watch ended")?;
        Ok(())
    }

    /// The Service `namespace/name`, if the store has it.
    pub fn service(&self, key: &str) -> Option<Arc<Service>> {
        get(&self.services, key)
    }

    /// The EndpointSlice `namespace/name`, if the store has it.
    pub fn slice(&self, key: &str) -> Option<Arc<EndpointSlice>> {
        get(&self.endpoint_slices, key)
    }

    /// The current objects, as owned values for the model.
    pub fn snapshot(&self) -> crate::manifest::Manifests {
        crate::manifest::Manifests {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            endpoint_slices: self
                .endpoint_slices
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            nodes: self.nodes.state().iter().map(|n| (**n).clone()).collect(),
            ..Default::default()
        }
    }
}

fn get<K>(store: &Store<K>, key: &str) -> Option<Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (namespace, name) = key.split_once('/')?;
    store.get(&reflector::ObjectRef::new(name).within(namespace))
}
