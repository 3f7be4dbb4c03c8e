//! Golden model tests: each `tests/golden/<case>.yaml` holds Services,
//! EndpointSlices and the Node the model runs for; `<case>.expected` holds
//! the frontends, tiers and problems the model must produce, as text a
//! review can read. Cases are read as the file source reads them:
//! Endpoints mirrored, ClusterIPs and node ports allocated from the default
//! ranges where a Service leaves them out. `XLB_BLESS=1 cargo test --test golden` rewrites the
//! expected files (then read the diff!).

use std::{fs, path::Path};

use lb_userspace::{
    model::{self, Node, allocate::Ranges},
    source::{Snapshot, file},
};

fn run_case(yaml: &Path) -> String {
    let text = fs::read_to_string(yaml).unwrap();
    let mut snapshot = Snapshot::default();
    file::parse_into("case", &text, &mut snapshot);
    let node = snapshot
        .nodes
        .first()
        .map(Node::from_manifest)
        .unwrap_or_else(|| panic!("{}: a case names its Node", yaml.display()));
    let (desired, problems) = model::desired(&snapshot, &node, Some(Ranges::default()));
    let mut out = desired.dump();
    for problem in problems {
        out.push_str(&format!("problem: {problem}\n"));
    }
    out
}

#[test]
fn golden_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("XLB_BLESS").is_some();
    let mut cases: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in &cases {
        let got = run_case(case);
        let expected_path = case.with_extension("expected");
        if bless {
            fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("missing {}", expected_path.display()));
        if got != expected {
            failures.push(format!(
                "--- {}\nexpected:\n{expected}got:\n{got}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Endpoints in, the same backends as the equivalent EndpointSlices.
#[test]
fn endpoints_mirror_to_the_frontends_of_the_equivalent_slices() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/endpoints-mirrored.yaml");
    let mut snapshot = Snapshot::default();
    file::parse_into("case", &fs::read_to_string(path).unwrap(), &mut snapshot);
    let node = Node::from_manifest(&snapshot.nodes[0]);
    let (desired, _) = model::desired(&snapshot, &node, None);
    let of = |service: &str| -> Vec<_> {
        let mut frontends: Vec<_> = desired
            .frontends
            .iter()
            .filter(|(_, f)| f.service_port.starts_with(service))
            .map(|(addr, f)| (addr.port, f.tiers.clone(), f.local.clone()))
            .collect();
        frontends.sort();
        frontends
    };
    let mirrored = of("default/my-service:");
    assert_eq!(mirrored.len(), 2);
    assert_eq!(mirrored, of("default/mirrored-twin:"));
}
