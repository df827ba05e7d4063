//! The Homebrew formula (packaging/homebrew/pexi.rb) against the repository: Ruby loads it with a stand-in
//! for Homebrew's DSL (packaging/homebrew/check.rb), which reports what it declares and what `install`
//! would run, and runs its `test do` block against the `pexi` this suite built. There is no Homebrew or
//! Mac here, so this is as close as the formula gets to `brew test` before it meets one.

use std::path::Path;
use std::process::Command;

use pexi_test_support::repo_root;

fn workspace_value(key: &str) -> String {
    let manifest: toml::Table = std::fs::read_to_string(repo_root().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("toml");
    manifest["workspace"]["package"][key]
        .as_str()
        .expect("a workspace.package string")
        .to_string()
}

#[test]
fn the_homebrew_formula_builds_this_repository_and_its_test_passes() {
    let root = repo_root();
    let formula = root.join("packaging/homebrew/pexi.rb");
    let pexi = Path::new(env!("CARGO_BIN_EXE_pexi"));
    let output = Command::new("ruby")
        .arg(root.join("packaging/homebrew/check.rb"))
        .arg(&formula)
        .arg(&root)
        .arg(pexi.parent().expect("bin folder"))
        .output()
        .unwrap_or_else(|err| {
            panic!("ruby ({err}): scripts/setup installs it (apt-get install ruby)")
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the formula's test block failed:\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("check.rb prints JSON");
    let declared = &report["declared"];

    // Where it builds from and under what licence: the workspace's own.
    let repository = workspace_value("repository");
    assert_eq!(declared["homepage"], repository.as_str());
    assert_eq!(
        declared["head"]["url"],
        format!("{repository}.git").as_str()
    );
    assert_eq!(declared["license"], workspace_value("license").as_str());
    // macOS on Apple Silicon, with vfkit for `pexi vm run`.
    let depends: Vec<&str> = declared["depends_on"]
        .as_array()
        .expect("depends_on")
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    for needed in ["vfkit", "macos", "{:arch=>:arm64}"] {
        assert!(depends.contains(&needed), "{needed} in {depends:?}");
    }

    // `install` runs one locked `cargo install` of the crate whose binary is `pexi`, and installs files
    // that exist.
    let ran = report["install"]["system"].as_array().expect("system");
    assert_eq!(ran.len(), 1, "{ran:?}");
    let args: Vec<&str> = ran[0]
        .as_array()
        .expect("argv")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(&args[..2], ["cargo", "install"]);
    assert!(args.contains(&"--locked"), "{args:?}");
    let path = args
        .iter()
        .position(|a| *a == "--path")
        .and_then(|i| args.get(i + 1))
        .expect("--path");
    let manifest = std::fs::read_to_string(root.join(path).join("Cargo.toml")).expect("crate");
    assert!(
        manifest.contains("[[bin]]\nname = \"pexi\""),
        "{path} builds pexi"
    );
    for item in report["install"]["pkgshare"].as_array().expect("pkgshare") {
        let item = item.as_str().expect("a path");
        assert!(root.join(item).exists(), "{item} is not in the repository");
    }

    // The test block ran its commands against this build, the policy's own tests among them.
    let test_ran = report["test_ran"].to_string();
    assert!(test_ran.contains("\"policy\",\"test\""), "{test_ran}");
    assert!(stderr.contains("policy: "), "{stderr}");
}
