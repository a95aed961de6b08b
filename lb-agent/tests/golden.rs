//! Golden tests in the Cilium style: a directory of manifests in, the expected `lb-agent plan`
//! JSON out, one case per behaviour (`tests/golden/<case>/`: `manifests/`, `node`, and
//! `expected.json`). `UPDATE_GOLDEN=1 cargo test -p lb-agent --test golden` rewrites the
//! expected files; review the diff before committing it.

use std::{fs, path::Path};

use lb_agent::{desired_from_manifests, manifest, node, plan};

#[test]
fn plans_match_the_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = fs::read_dir(&root)
        .expect("golden directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 7, "golden cases missing: {cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let node_name = fs::read_to_string(case.join("node")).expect("node file");
        let node_name = node_name.trim();
        let manifests = manifest::read_dir(&case.join("manifests")).expect("manifests");
        assert!(
            manifests.errors.is_empty(),
            "{name}: {:?}",
            manifests.errors
        );
        let settings = node::settings(node_name, &manifests.nodes, &[], &plan::ANY_NODE_ADDRESS);
        let state = desired_from_manifests(&manifests, &settings);
        assert!(state.errors.is_empty(), "{name}: {:?}", state.errors);
        let got = serde_json::to_value(plan::plan(node_name, &state)).expect("json");
        let expected_path = case.join("expected.json");
        if update {
            let text = serde_json::to_string_pretty(&got).expect("json") + "\n";
            fs::write(&expected_path, text).expect("write expected");
            continue;
        }
        let expected: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(&expected_path)
                .unwrap_or_else(|_| panic!("{name}: no expected.json")),
        )
        .expect("expected.json is JSON");
        if got != expected {
            failures.push(format!(
                "{name}:\n--- expected\n{}\n--- got\n{}",
                serde_json::to_string_pretty(&expected).unwrap(),
                serde_json::to_string_pretty(&got).unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
