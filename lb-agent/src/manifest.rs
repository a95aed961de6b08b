//! Standalone mode's input: Service and EndpointSlice objects read from a directory of YAML
//! (or JSON) manifests, several documents per file allowed.
//!
//! A broken document never hides the others: each document is parsed on its own, and every
//! failure is returned as a [`ManifestError`] naming the file, the document, the object (when
//! its kind and name could be read) and the field.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;

/// Everything read from a manifest directory.
#[derive(Debug, Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// v1 Endpoints, mirrored into slices (see `mirror`).
    pub endpoints: Vec<Endpoints>,
    /// Node objects: the agent's own one gives its zone and addresses.
    pub nodes: Vec<Node>,
    /// Documents that could not be used; the rest loaded regardless.
    pub errors: Vec<ManifestError>,
    /// Documents of kinds this agent does not consume (Deployments, ...), by `Kind ns/name`.
    pub ignored: Vec<String>,
}

/// One document that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// `Kind namespace/name`, when the document got that far.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, ", {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursive), in name order.
///
/// Fails only when the directory itself cannot be listed; unreadable files and bad documents
/// are reported in [`Manifests::errors`].
pub fn read_dir(dir: &Path) -> anyhow::Result<Manifests> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)
        .with_context(|| format!("reading manifest directory {}", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let is_manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if is_manifest && path.is_file() {
            files.push(path);
        }
    }
    files.sort();

    let mut manifests = Manifests::default();
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => parse_into(&file, &text, &mut manifests),
            Err(err) => manifests.errors.push(ManifestError {
                file: file.clone(),
                document: 0,
                object: None,
                message: format!("cannot read file: {err}"),
            }),
        }
    }
    Ok(manifests)
}

/// Parses the documents of one file into `out`.
pub fn parse_into(file: &Path, text: &str, out: &mut Manifests) {
    for (index, document) in split_documents(text).into_iter().enumerate() {
        let document_no = index + 1;
        let error = |object: Option<String>, message: String| ManifestError {
            file: file.to_path_buf(),
            document: document_no,
            object,
            message,
        };
        let value: serde_yaml::Value = match serde_yaml::from_str(document) {
            Ok(value) => value,
            Err(err) => {
                out.errors
                    .push(error(None, format!("not valid YAML: {err}")));
                continue;
            }
        };
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        let object = describe(&value);
        match (api_version, kind) {
            ("v1", "Service") => match decode::<Service>(value).and_then(named) {
                Ok(mut service) => {
                    default_namespace(&mut service.metadata);
                    out.services.push(service);
                }
                Err(message) => out.errors.push(error(Some(object), message)),
            },
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                match decode::<EndpointSlice>(value).and_then(named) {
                    Ok(mut slice) => {
                        default_namespace(&mut slice.metadata);
                        out.endpoint_slices.push(slice);
                    }
                    Err(message) => out.errors.push(error(Some(object), message)),
                }
            }
            ("v1", "Endpoints") => match decode::<Endpoints>(value).and_then(named) {
                Ok(mut endpoints) => {
                    default_namespace(&mut endpoints.metadata);
                    out.endpoints.push(endpoints);
                }
                Err(message) => out.errors.push(error(Some(object), message)),
            },
            ("v1", "Node") => match decode::<Node>(value) {
                Ok(node) => out.nodes.push(node),
                Err(message) => out.errors.push(error(Some(object), message)),
            },
            (_, "Service" | "EndpointSlice" | "Endpoints" | "Node") => out.errors.push(error(
                Some(object),
                format!("field `apiVersion`: unsupported {api_version:?} for kind {kind} (want v1 / discovery.k8s.io/v1)"),
            )),
            (_, "") => out.errors.push(error(None, "field `kind`: missing".to_string())),
            _ => out.ignored.push(object),
        }
    }
}

/// Deserialises into a Kubernetes type, naming the offending field on failure.
fn decode<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path.is_empty() || path == "." {
            inner.to_string()
        } else {
            format!("field `{path}`: {inner}")
        }
    })
}

/// Refuses a nameless object: it could not exist in a cluster, and two of them would be taken
/// for one.
fn named<
    T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    object: T,
) -> Result<T, String> {
    if object.metadata().name.as_deref().unwrap_or("").is_empty() {
        return Err("field `metadata.name`: missing".to_string());
    }
    Ok(object)
}

/// `Kind namespace/name` as far as the raw document tells.
fn describe(value: &serde_yaml::Value) -> String {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("object");
    let metadata = value.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let namespace = field("namespace").unwrap_or_else(|| "default".to_string());
    match field("name") {
        Some(name) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {namespace}/<unnamed>"),
    }
}

/// Like `kubectl apply`, objects without a namespace land in `default`.
fn default_namespace(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    if meta.namespace.as_deref().unwrap_or("").is_empty() {
        meta.namespace = Some("default".to_string());
    }
}

/// Splits a multi-document YAML stream on `---` separator lines, so that a syntax error in one
/// document cannot swallow the documents after it.
fn split_documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        let is_separator = trimmed == "---" || trimmed.starts_with("--- ");
        if is_separator {
            documents.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push(&text[start..]);
    documents
        .into_iter()
        .filter(|d| !d.trim().is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Manifests {
        let mut out = Manifests::default();
        parse_into(Path::new("test.yaml"), text, &mut out);
        out
    }

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.20
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

    const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: [\"10.244.1.2\"]
  conditions:
    ready: true
";

    #[test]
    fn reads_several_documents_of_several_kinds() {
        let out = parse(&format!("{SERVICE}---\n{SLICE}---\n"));
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.services.len(), 1);
        assert_eq!(out.endpoint_slices.len(), 1);
        let service = &out.services[0];
        assert_eq!(service.metadata.name.as_deref(), Some("web"));
        assert_eq!(service.metadata.namespace.as_deref(), Some("shop"));
        let slice = &out.endpoint_slices[0];
        assert_eq!(slice.endpoints[0].addresses, vec!["10.244.1.2".to_string()]);
    }

    #[test]
    fn malformed_document_is_reported_and_the_others_still_load() {
        // The middle document has a port that is not a number.
        let bad = "apiVersion: v1
kind: Service
metadata:
  name: broken
spec:
  ports:
  - port: eighty
";
        let out = parse(&format!("{SERVICE}---\n{bad}---\n{SLICE}"));
        assert_eq!(out.services.len(), 1, "the good Service still loads");
        assert_eq!(
            out.endpoint_slices.len(),
            1,
            "the slice after it still loads"
        );
        assert_eq!(out.errors.len(), 1);
        let err = &out.errors[0];
        assert_eq!(err.document, 2);
        assert_eq!(err.object.as_deref(), Some("Service default/broken"));
        assert!(
            err.message.contains("spec.ports[0].port"),
            "message names the field: {}",
            err.message
        );
        let shown = err.to_string();
        assert!(
            shown.starts_with("test.yaml (document 2), Service default/broken"),
            "{shown}"
        );
    }

    #[test]
    fn yaml_syntax_error_does_not_swallow_later_documents() {
        let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n";
        let out = parse(&format!("{broken}---\n{SERVICE}"));
        assert_eq!(out.services.len(), 1);
        assert_eq!(out.errors.len(), 1);
        assert_eq!(out.errors[0].document, 1);
        assert!(out.errors[0].message.contains("not valid YAML"));
    }

    #[test]
    fn missing_kind_and_wrong_api_version_are_errors_other_kinds_are_ignored() {
        let no_kind = "apiVersion: v1\nmetadata: {name: x}\n";
        let old_slice = SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1");
        let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let out = parse(&format!("{no_kind}---\n{old_slice}---\n{deployment}"));
        assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
        assert_eq!(out.errors[0].message, "field `kind`: missing");
        assert!(out.errors[1]
            .message
            .starts_with("field `apiVersion`: unsupported"));
        assert_eq!(
            out.errors[1].object.as_deref(),
            Some("EndpointSlice shop/web-abc")
        );
        assert_eq!(out.ignored, vec!["Deployment default/d".to_string()]);
    }

    #[test]
    fn separators_with_comments_and_empty_documents() {
        let out = parse(&format!("---\n{SERVICE}--- # next\n\n---\n"));
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.services.len(), 1);
    }

    #[test]
    fn read_dir_reads_yaml_files_in_order_and_reports_per_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("b.yaml"), SLICE).expect("write");
        fs::write(dir.path().join("a.yml"), SERVICE).expect("write");
        fs::write(
            dir.path().join("c.yaml"),
            "kind: Service\napiVersion: v1\nspec: 3\n",
        )
        .expect("write");
        fs::write(dir.path().join("notes.txt"), "not a manifest").expect("write");
        let out = read_dir(dir.path()).expect("read_dir");
        assert_eq!(out.services.len(), 1);
        assert_eq!(out.endpoint_slices.len(), 1);
        assert_eq!(out.errors.len(), 1);
        assert!(out.errors[0].file.ends_with("c.yaml"));
        assert!(
            out.errors[0].message.contains("spec"),
            "{}",
            out.errors[0].message
        );
    }

    #[test]
    fn read_dir_fails_on_missing_directory() {
        let err = read_dir(Path::new("/nonexistent/lb-manifests")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/lb-manifests"));
    }
}
