//! The file source: multi-document Kubernetes YAML (Services and
//! `discovery.k8s.io/v1` EndpointSlices, also inside `kind: List` as
//! `kubectl get -o yaml` prints several objects) from a file or a directory.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_yaml_ng::Value;

use super::Snapshot;
use crate::problem::{Invalid, Problem};

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

/// Each manifest file's path, inode, size and modification time (s, ns).
pub type Fingerprint = Vec<(PathBuf, u64, u64, i64, i64)>;

/// What identifies the current contents of the manifests. An edit in place
/// changes the time, an atomic rename-over changes the inode.
pub fn fingerprint(path: &Path) -> Fingerprint {
    let files = manifest_files(path).unwrap_or_default();
    files
        .into_iter()
        .filter_map(|file| {
            let meta = fs::metadata(&file).ok()?;
            Some((
                file,
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
            ))
        })
        .collect()
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
}
