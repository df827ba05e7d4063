//! The host's modules form layers: each may use only the modules below it, so there is no import circle and
//! no lower layer reaches up (docs/architecture.md draws the same picture). Doc comments may name any
//! module; code may not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Low to high. A module may use modules of earlier layers only.
const LAYERS: &[&[&str]] = &[
    &["dirs", "policy", "audit", "activity", "metrics"],
    &["secrets", "approvals"],
    &["config"],
    &["limits"],
    &["stream"],
    &["pipeline"],
    &["serve", "reload", "control", "export", "bundle_sync"],
    &["transport"],
    &["server"],
    &["vm"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .expect("read host/src")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            rust_files(&entry, out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The `crate::<module>` paths used by code (not comments) in `text`.
fn used_modules(text: &str) -> Vec<String> {
    let mut used = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.push(name);
            }
            rest = after;
        }
    }
    used
}

#[test]
fn host_modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("read host/src") {
        let path = entry.expect("dir entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if matches!(stem, "lib" | "main") {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&path, &mut files);
        modules.entry(stem.to_string()).or_default().extend(files);
    }
    let mut violations = Vec::new();
    for (module, files) in &modules {
        let Some(own) = layer_of(module) else {
            violations.push(format!(
                "{module}: not placed in a layer (add it to LAYERS and to docs/architecture.md)"
            ));
            continue;
        };
        for file in files {
            let text = std::fs::read_to_string(file).expect("read source");
            if text.lines().any(|l| {
                let code = l.split("//").next().unwrap_or("");
                code.contains("super::super::")
            }) {
                violations.push(format!(
                    "{}: reaches out with super::super:: (name the module with crate::)",
                    file.display()
                ));
            }
            for used in used_modules(&text) {
                if &used == module {
                    continue;
                }
                match layer_of(&used) {
                    Some(layer) if layer < own => {}
                    Some(_) => violations.push(format!(
                        "{}: `{module}` uses `crate::{used}`, which is not below it",
                        file.display()
                    )),
                    None => {}
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering broken:\n{}",
        violations.join("\n")
    );
}

/// The checker itself: a use that reaches up is found, one in a comment is not.
#[test]
fn the_layer_checker_sees_code_and_skips_comments() {
    let text = "use crate::serve::Admitted;\n/// See [`crate::cli`].\nlet x = crate::pipeline::Caller { }; // crate::vm\n";
    assert_eq!(used_modules(text), vec!["serve", "pipeline"]);
}
