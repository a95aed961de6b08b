//! Incremental programming: objects come in one by one (watch events), and only the Services
//! they touch are recomputed and re-applied. A change to one endpoint of one Service costs the
//! model that Service and the maps a handful of writes, whatever the size of the cluster.
//!
//! The engine keeps each Service's part of the desired state ([`model::service_part`]) and
//! counts, per backend, the parts that use it, so it can tell the applier which backends are new
//! and which nobody uses any more without looking at the other Services.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

// Seeded per process; keys are object names and addresses from the API.
use foldhash::{HashMap, HashSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::{self, Backend, DesiredService, DesiredState, HealthCheck, Settings};

/// What changed in the desired state since the last [`Engine::take_delta`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Entries (`ns/name:port/PROTO[#local]`) that are new or differ.
    pub upsert: BTreeMap<String, DesiredService>,
    /// Entries that are gone.
    pub remove: BTreeSet<String>,
    /// Every backend the changed Services use (chosen or known), with its flags
    /// (`BACKEND_REMOTE`, `BACKEND_TERMINATING`): written when new or when the flags differ.
    pub backends: BTreeMap<Backend, u8>,
    /// Backends no Service uses any more.
    pub released: BTreeSet<Backend>,
    /// The Services (`ns/name`) recomputed.
    pub services: BTreeSet<String>,
    /// Field errors of the recomputed Services (they are left out, in whole or in part).
    pub errors: Vec<model::ModelError>,
    /// Recomputed Services that rightly get no frontend, with why.
    pub skipped: Vec<(String, String)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty()
            && self.remove.is_empty()
            && self.released.is_empty()
            && self.backends.is_empty()
    }
}

/// At most this many threads compute parts at once (a start or relist on a big node).
const MAX_THREADS: usize = 4;

/// Objects in, per-Service parts of the desired state out.
#[derive(Default)]
pub struct Engine {
    settings: Settings,
    /// Shared with the watch stores: the engine adds no copy of the objects.
    services: HashMap<String, Arc<Service>>,
    slices: HashMap<String, Arc<EndpointSlice>>,
    /// Slice key -> the Service key its label names.
    slice_owner: HashMap<String, String>,
    slices_by_service: HashMap<String, BTreeSet<String>>,
    parts: HashMap<String, DesiredState>,
    /// Parts using each backend (chosen or known).
    backend_users: HashMap<Backend, u32>,
    /// Health-check NodePorts of every part.
    health_checks: BTreeMap<u16, HealthCheck>,
    /// Entries claiming each frontend address, port and protocol. Two Services may claim one
    /// (an externalIP, say); the first by name gets it, as in a full sync, so every claimant
    /// of a contested frontend goes into a delta that changes any of the claims.
    claims: HashMap<(std::net::Ipv4Addr, u16, model::Protocol), BTreeSet<String>>,
    dirty: HashSet<String>,
}

fn slice_service(slice: &EndpointSlice) -> Option<String> {
    let service = slice
        .metadata
        .labels
        .as_ref()?
        .get(model::LABEL_SERVICE_NAME)?;
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    Some(format!("{namespace}/{service}"))
}

/// The backends a part uses, with the flags the datapath's backend entry carries, in order
/// (a sorted vector: parts hold a handful, and a start computes 10,000s of them).
fn part_backends(part: &DesiredState) -> Vec<(Backend, u8)> {
    let mut out: Vec<(Backend, u8)> = part
        .services
        .values()
        .flat_map(|s| &s.backends)
        .chain(&part.known_backends)
        // Flags are the endpoint's own (its node, its conditions), the same in every part that
        // lists it, so writing them from the parts that changed agrees with the others.
        .map(|backend| (*backend, crate::maps::backend_flags(part, backend)))
        .collect();
    out.sort_unstable();
    out.dedup_by_key(|(b, _)| *b);
    out
}

fn has_backend(list: &[(Backend, u8)], backend: &Backend) -> bool {
    list.binary_search_by(|(b, _)| b.cmp(backend)).is_ok()
}

impl Engine {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// New node settings (zone, addresses) change every Service's part.
    pub fn set_settings(&mut self, settings: Settings) {
        if settings != self.settings {
            self.settings = settings;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn apply_service(&mut self, service: impl Into<Arc<Service>>) {
        let service = service.into();
        self.put_service(model::namespaced(&service.metadata), service);
    }

    fn put_service(&mut self, key: String, service: Arc<Service>) {
        self.dirty.insert(key.clone());
        self.services.insert(key, service);
    }

    pub fn delete_service(&mut self, key: &str) {
        if self.services.remove(key).is_some() {
            self.dirty.insert(key.to_string());
        }
    }

    pub fn apply_slice(&mut self, slice: impl Into<Arc<EndpointSlice>>) {
        let slice = slice.into();
        self.put_slice(model::namespaced(&slice.metadata), slice);
    }

    fn put_slice(&mut self, key: String, slice: Arc<EndpointSlice>) {
        let owner = slice_service(&slice);
        // A slice relabelled to another Service leaves the first one.
        if let Some(previous) = self.slice_owner.remove(&key) {
            if let Some(set) = self.slices_by_service.get_mut(&previous) {
                set.remove(&key);
            }
            self.dirty.insert(previous);
        }
        if let Some(owner) = owner {
            self.slices_by_service
                .entry(owner.clone())
                .or_default()
                .insert(key.clone());
            self.slice_owner.insert(key.clone(), owner.clone());
            self.dirty.insert(owner);
        }
        self.slices.insert(key, slice);
    }

    pub fn delete_slice(&mut self, key: &str) {
        self.slices.remove(key);
        if let Some(owner) = self.slice_owner.remove(key) {
            if let Some(set) = self.slices_by_service.get_mut(&owner) {
                set.remove(key);
            }
            self.dirty.insert(owner);
        }
    }

    /// Replaces every object (a relist): only the Services whose objects differ are marked.
    pub fn replace_all(&mut self, services: Vec<Arc<Service>>, slices: Vec<Arc<EndpointSlice>>) {
        if self.services.is_empty() && self.slices.is_empty() {
            // The first list (a start): nothing to compare with or to find gone.
            self.services.reserve(services.len());
            self.slices.reserve(slices.len());
            self.slice_owner.reserve(slices.len());
            self.slices_by_service.reserve(services.len());
            self.dirty.reserve(services.len());
            for service in services {
                self.put_service(model::namespaced(&service.metadata), service);
            }
            for slice in slices {
                self.put_slice(model::namespaced(&slice.metadata), slice);
            }
            return;
        }
        let services: HashMap<String, Arc<Service>> = services
            .into_iter()
            .map(|s| (model::namespaced(&s.metadata), s))
            .collect();
        let slices: HashMap<String, Arc<EndpointSlice>> = slices
            .into_iter()
            .map(|s| (model::namespaced(&s.metadata), s))
            .collect();
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|k| !services.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.delete_service(&key);
        }
        let gone: Vec<String> = self
            .slices
            .keys()
            .filter(|k| !slices.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.delete_slice(&key);
        }
        for (key, service) in services {
            if self.services.get(&key) != Some(&service) {
                self.put_service(key, service);
            }
        }
        for (key, slice) in slices {
            if self.slices.get(&key) != Some(&slice) {
                self.put_slice(key, slice);
            }
        }
    }

    /// Recomputes the Services marked since the last call and returns what changed.
    pub fn take_delta(&mut self) -> Delta {
        self.recompute(true)
    }

    /// Recomputes the Services marked since the last call, before a full sync: the engine's
    /// own books are kept as [`Engine::take_delta`] keeps them, but no delta is built (a full
    /// sync reads [`Engine::sync_input`] instead).
    pub fn settle(&mut self) {
        self.recompute(false);
    }

    fn recompute(&mut self, build: bool) -> Delta {
        let mut delta = Delta::default();
        let mut contested = BTreeSet::new();
        let empty = DesiredState::default();
        // A relist marks thousands at once: grow the tables once, not step by step.
        self.parts.reserve(self.dirty.len());
        // In name order, so a delta's errors come in the same order every time.
        let mut keys: Vec<String> = std::mem::take(&mut self.dirty).into_iter().collect();
        keys.sort_unstable();
        let computed = self.compute_parts(&keys);
        for (key, new) in keys.into_iter().zip(computed) {
            // The old part is only read: the new one moves in at the end, uncloned.
            let old = self.parts.get(&key);
            if old == new.as_ref() {
                continue;
            }
            let old = old.unwrap_or(&empty);
            let new_ref = new.as_ref().unwrap_or(&empty);
            for port in old.health_checks.keys() {
                self.health_checks.remove(port);
            }
            self.health_checks.extend(
                new_ref
                    .health_checks
                    .iter()
                    .map(|(port, check)| (*port, check.clone())),
            );
            let claim_key = |f: &model::Frontend| (f.addr, f.port, f.protocol);
            for (name, entry) in &old.services {
                for frontend in &entry.frontends {
                    let key = claim_key(frontend);
                    if let Some(claimants) = self.claims.get_mut(&key) {
                        if claimants.len() > 1 {
                            contested.insert(key);
                        }
                        claimants.remove(name);
                        if claimants.is_empty() {
                            self.claims.remove(&key);
                        }
                    }
                }
            }
            for (name, entry) in &new_ref.services {
                for frontend in &entry.frontends {
                    let claimants = self.claims.entry(claim_key(frontend)).or_default();
                    if !claimants.contains(name) {
                        claimants.insert(name.clone());
                    }
                    if claimants.len() > 1 {
                        contested.insert(claim_key(frontend));
                    }
                }
            }
            if build {
                delta.errors.extend(new_ref.errors.iter().cloned());
                delta.skipped.extend(new_ref.skipped.iter().cloned());
                for (name, entry) in &new_ref.services {
                    if old.services.get(name) != Some(entry) {
                        delta.upsert.insert(name.clone(), entry.clone());
                    }
                }
                for name in old.services.keys() {
                    if !new_ref.services.contains_key(name) {
                        delta.remove.insert(name.clone());
                    }
                }
            }
            let (old_backends, new_backends) = (part_backends(old), part_backends(new_ref));
            for (backend, _) in &new_backends {
                if !has_backend(&old_backends, backend) {
                    *self.backend_users.entry(*backend).or_default() += 1;
                }
            }
            for (backend, _) in &old_backends {
                if !has_backend(&new_backends, backend) {
                    let users = self.backend_users.entry(*backend).or_default();
                    *users = users.saturating_sub(1);
                    if *users == 0 {
                        self.backend_users.remove(backend);
                        delta.released.insert(*backend);
                    }
                }
            }
            if build {
                for (backend, flags) in new_backends {
                    delta.released.remove(&backend);
                    *delta.backends.entry(backend).or_default() |= flags;
                }
            }
            if build {
                delta.services.insert(key.clone());
            }
            match new {
                Some(new) => self.parts.insert(key, new),
                None => self.parts.remove(&key),
            };
        }
        if build {
            for key in contested {
                let Some(claimants) = self.claims.get(&key) else {
                    continue;
                };
                for name in claimants {
                    if delta.upsert.contains_key(name) {
                        continue;
                    }
                    let service = name.split_once(':').map_or(name.as_str(), |(s, _)| s);
                    if let Some(entry) = self.parts.get(service).and_then(|p| p.services.get(name))
                    {
                        delta.upsert.insert(name.clone(), entry.clone());
                    }
                }
            }
        }
        // A backend released by one Service and taken up by another in the same round stays.
        delta
            .released
            .retain(|b| !self.backend_users.contains_key(b));
        delta
    }

    /// The parts of the Services `keys` names (`None`: the Service is gone). Each part depends
    /// on its own Service and slices only, so a big batch (a start or a relist) is split over
    /// the CPUs; a handful is computed right here.
    fn compute_parts(&self, keys: &[String]) -> Vec<Option<DesiredState>> {
        let part = |key: &String| {
            self.services.get(key).map(|service| {
                let slices: Vec<&EndpointSlice> = self
                    .slices_by_service
                    .get(key)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| self.slices.get(k).map(|s| &**s))
                    .collect();
                model::service_part(service, &slices, &self.settings)
            })
        };
        const PER_THREAD: usize = 1024;
        if keys.len() < 2 * PER_THREAD {
            return keys.iter().map(part).collect();
        }
        // (Not asked every time: it reads the cgroup's CPU quota.)
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(keys.len() / PER_THREAD)
            .min(MAX_THREADS);
        if threads <= 1 {
            return keys.iter().map(part).collect();
        }
        let chunk = keys.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let mut chunks = keys.chunks(chunk);
            let here = chunks.next().unwrap_or_default();
            let others: Vec<_> = chunks
                .map(|c| scope.spawn(move || c.iter().map(part).collect::<Vec<_>>()))
                .collect();
            let mut out: Vec<Option<DesiredState>> = here.iter().map(part).collect();
            for handle in others {
                match handle.join() {
                    Ok(parts) => out.extend(parts),
                    // A panic in the model is a bug; surface it as it would surface here.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            out
        })
    }

    /// The whole desired state (for a full resync): the union of the parts.
    pub fn desired(&self) -> DesiredState {
        let mut state = DesiredState {
            node_addresses: self.node_addresses(),
            health_checks: self.all_health_checks(),
            ..DesiredState::default()
        };
        let mut keys: Vec<&String> = self.parts.keys().collect();
        keys.sort();
        for key in keys {
            let part = &self.parts[key];
            state.services.extend(
                part.services
                    .iter()
                    .map(|(name, entry)| (name.clone(), entry.clone())),
            );
            state.known_backends.extend(&part.known_backends);
            state.remote_backends.extend(&part.remote_backends);
            state
                .terminating_backends
                .extend(&part.terminating_backends);
            state.errors.extend(part.errors.iter().cloned());
            state.skipped.extend(part.skipped.iter().cloned());
        }
        state
    }

    /// The whole desired state as a full sync reads it, borrowed from the parts (no merged
    /// copy: at 10,000 Services that copy cost as much as computing the parts).
    pub fn sync_input(&self) -> crate::maps::SyncInput<'_> {
        let mut input = crate::maps::SyncInput {
            entries: self
                .parts
                .values()
                .flat_map(|p| p.services.iter().map(|(n, s)| (n.as_str(), s)))
                .collect(),
            backends: HashMap::with_capacity_and_hasher(
                self.backend_users.len(),
                Default::default(),
            ),
            node_addresses: self.node_addresses(),
        };
        input.entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for part in self.parts.values() {
            input.add_backends(part);
        }
        input
    }

    /// Services that rightly get no frontend, with why, as last computed.
    pub fn skipped(&self) -> impl Iterator<Item = &(String, String)> {
        self.parts.values().flat_map(|p| &p.skipped)
    }

    /// One Service's part of the desired state (`ns/name`), as last computed.
    pub fn desired_service(&self, key: &str) -> Option<&DesiredState> {
        self.parts.get(key)
    }

    /// The node's addresses, as the applier marks frontends on them.
    pub fn node_addresses(&self) -> BTreeSet<std::net::Ipv4Addr> {
        self.settings
            .node_addresses
            .iter()
            .chain(&self.settings.local_addresses)
            .copied()
            .collect()
    }

    /// Health-check NodePorts of every Service, as kept step by step.
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
    }

    /// Health-check NodePorts of every Service, gathered afresh from the parts in key order
    /// (a full sync's: it repairs whatever the step-by-step table lost, two Services naming
    /// one port say).
    pub fn all_health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        let mut keys: Vec<&String> = self
            .parts
            .iter()
            .filter(|(_, p)| !p.health_checks.is_empty())
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        let mut all = BTreeMap::new();
        for key in keys {
            all.extend(
                self.parts[key]
                    .health_checks
                    .iter()
                    .map(|(port, check)| (*port, check.clone())),
            );
        }
        all
    }

    /// Field errors of every Service as last computed.
    pub fn errors(&self) -> impl Iterator<Item = &model::ModelError> {
        self.parts.values().flat_map(|p| &p.errors)
    }

    /// Services with a pending change.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}"
        ))
        .unwrap()
    }

    fn slice(service: &str, name: &str, addresses: &[&str]) -> EndpointSlice {
        let endpoints: Vec<String> = addresses
            .iter()
            .map(|a| format!("{{addresses: [\"{a}\"]}}"))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\n\
             endpoints: [{}]",
            endpoints.join(",")
        ))
        .unwrap()
    }

    fn backend(addr: &str) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            port: 8080,
            protocol: model::Protocol::Tcp,
        }
    }

    fn full(engine: &Engine) -> DesiredState {
        let services: Vec<Service> = engine.services.values().map(|s| (**s).clone()).collect();
        let slices: Vec<EndpointSlice> = engine.slices.values().map(|s| (**s).clone()).collect();
        model::desired_state(&services, &slices, &engine.settings)
    }

    #[test]
    fn one_endpoint_change_touches_one_service() {
        let mut engine = Engine::default();
        for i in 0..50 {
            engine.apply_service(service(&format!("s{i}"), &format!("10.96.0.{i}")));
            engine.apply_slice(slice(
                &format!("s{i}"),
                &format!("s{i}-a"),
                &[&format!("10.1.{i}.1"), &format!("10.1.{i}.2")],
            ));
        }
        let first = engine.take_delta();
        assert_eq!(first.upsert.len(), 50);
        assert_eq!(first.backends.len(), 100);
        assert_eq!(engine.desired(), full(&engine));

        engine.apply_slice(slice("s7", "s7-a", &["10.1.7.1", "10.1.7.9"]));
        let delta = engine.take_delta();
        assert_eq!(delta.services, BTreeSet::from(["ns/s7".to_string()]));
        assert_eq!(delta.upsert.keys().collect::<Vec<_>>(), ["ns/s7:http/TCP"]);
        assert!(delta.remove.is_empty());
        assert_eq!(delta.released, BTreeSet::from([backend("10.1.7.2")]));
        assert!(delta.backends.contains_key(&backend("10.1.7.9")));
        assert_eq!(engine.desired(), full(&engine));

        // Nothing changed: nothing to do.
        engine.apply_slice(slice("s7", "s7-a", &["10.1.7.1", "10.1.7.9"]));
        assert!(engine.take_delta().is_empty());
    }

    #[test]
    fn settling_keeps_the_books_as_a_delta_does() {
        let (mut settled, mut delta_taken) = (Engine::default(), Engine::default());
        for engine in [&mut settled, &mut delta_taken] {
            engine.apply_service(service("a", "10.96.0.1"));
            engine.apply_service(service("b", "10.96.0.2"));
            engine.apply_slice(slice("a", "a-1", &["10.1.0.1", "10.1.0.2"]));
            engine.apply_slice(slice("b", "b-1", &["10.1.0.2"]));
        }
        settled.settle();
        assert!(!delta_taken.take_delta().is_empty());
        assert_eq!(settled.pending(), 0);
        assert_eq!(settled.desired(), delta_taken.desired());
        // The next change sees the same past in both: only `a`, and 10.1.0.1 released while
        // 10.1.0.2 (still used by `b`) stays.
        for engine in [&mut settled, &mut delta_taken] {
            engine.apply_slice(slice("a", "a-1", &["10.1.0.3"]));
        }
        let (one, other) = (settled.take_delta(), delta_taken.take_delta());
        assert_eq!(one, other);
        assert_eq!(one.services, BTreeSet::from(["ns/a".to_string()]));
        assert_eq!(
            one.released,
            BTreeSet::from([backend("10.1.0.1")]),
            "10.1.0.2 is still b's"
        );
    }

    #[test]
    fn a_batch_big_enough_to_be_split_over_threads_gives_the_whole_model() {
        let mut engine = Engine::default();
        let n = 3000; // over two threads' worth where there are two CPUs
        for i in 0..n {
            let (a, b) = (i / 250, i % 250);
            engine.apply_service(service(&format!("s{i}"), &format!("10.96.{a}.{b}")));
            engine.apply_slice(slice(
                &format!("s{i}"),
                &format!("s{i}-a"),
                &[&format!("10.1.{a}.{b}"), &format!("10.2.{a}.{b}")],
            ));
        }
        let delta = engine.take_delta();
        assert_eq!(delta.upsert.len(), n);
        assert_eq!(delta.backends.len(), 2 * n);
        assert_eq!(engine.desired(), full(&engine));
        // Each part is filed under its own Service.
        for i in 0..n {
            let key = format!("ns/s{i}");
            let part = engine.desired_service(&key).unwrap();
            assert_eq!(
                part.services.keys().collect::<Vec<_>>(),
                [&format!("{key}:http/TCP")]
            );
        }
    }

    #[test]
    fn a_first_list_gives_what_the_same_objects_one_by_one_give() {
        let services = [service("a", "10.96.0.1"), service("b", "10.96.0.2")];
        let slices = [
            slice("a", "a-1", &["10.1.0.1"]),
            slice("b", "b-1", &["10.1.0.2"]),
            // A second copy of a slice in one list: the last one counts.
            slice("a", "a-1", &["10.1.0.3"]),
        ];
        let mut listed = Engine::default();
        listed.replace_all(
            services.iter().cloned().map(Arc::new).collect(),
            slices.iter().cloned().map(Arc::new).collect(),
        );
        let mut fed = Engine::default();
        for s in &services {
            fed.apply_service(s.clone());
        }
        for s in &slices {
            fed.apply_slice(s.clone());
        }
        assert_eq!(listed.take_delta(), fed.take_delta());
        assert_eq!(listed.desired(), fed.desired());
        assert_eq!(listed.desired(), full(&listed));
        assert!(!listed
            .desired()
            .known_backends
            .contains(&backend("10.1.0.1")));
    }

    #[test]
    fn shared_backends_are_released_only_by_their_last_user() {
        let mut engine = Engine::default();
        engine.apply_service(service("a", "10.96.0.1"));
        engine.apply_service(service("b", "10.96.0.2"));
        engine.apply_slice(slice("a", "a-1", &["10.1.0.1"]));
        engine.apply_slice(slice("b", "b-1", &["10.1.0.1"]));
        engine.take_delta();
        engine.delete_service("ns/a");
        let delta = engine.take_delta();
        assert_eq!(delta.remove, BTreeSet::from(["ns/a:http/TCP".to_string()]));
        assert!(delta.released.is_empty(), "b still uses it");
        engine.delete_slice("ns/b-1");
        let delta = engine.take_delta();
        assert_eq!(delta.released, BTreeSet::from([backend("10.1.0.1")]));
        assert_eq!(engine.desired(), full(&engine));
    }

    #[test]
    fn a_relabelled_slice_moves_between_services_and_a_relist_marks_only_differences() {
        let mut engine = Engine::default();
        engine.apply_service(service("a", "10.96.0.1"));
        engine.apply_service(service("b", "10.96.0.2"));
        engine.apply_slice(slice("a", "x", &["10.1.0.1"]));
        engine.take_delta();
        engine.apply_slice(slice("b", "x", &["10.1.0.1"]));
        let delta = engine.take_delta();
        assert_eq!(
            delta.services,
            BTreeSet::from(["ns/a".to_string(), "ns/b".to_string()])
        );
        assert!(delta.released.is_empty(), "moved, not released");
        assert_eq!(engine.desired(), full(&engine));

        let services = vec![
            Arc::new(service("a", "10.96.0.1")),
            Arc::new(service("b", "10.96.0.2")),
        ];
        engine.replace_all(
            services.clone(),
            vec![Arc::new(slice("b", "x", &["10.1.0.1"]))],
        );
        assert_eq!(engine.pending(), 0, "identical relist: nothing marked");
        engine.replace_all(services, vec![]);
        let delta = engine.take_delta();
        assert_eq!(delta.services, BTreeSet::from(["ns/b".to_string()]));
        assert_eq!(delta.released, BTreeSet::from([backend("10.1.0.1")]));
    }

    #[test]
    fn new_settings_recompute_everything() {
        let mut engine = Engine::default();
        engine.apply_service(service("a", "10.96.0.1"));
        engine.take_delta();
        engine.set_settings(Settings::default());
        assert_eq!(engine.pending(), 0, "same settings");
        engine.set_settings(Settings {
            node_name: "n1".into(),
            ..Settings::default()
        });
        assert_eq!(engine.pending(), 1);
    }
}
