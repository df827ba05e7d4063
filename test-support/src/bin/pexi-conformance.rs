//! `pexi-conformance guest --name NAME -- DRIVER [ARGS...]`: runs every guest scenario of
//! `protocol/conformance/guest/` against one guest implementation's driver (protocol/conformance/README.md)
//! and prints a line per scenario. Exit status 0 when all pass, 1 when any fails, 2 for a usage error.
//!
//! `--scenarios DIR` reads scenarios from elsewhere; `--only TEXT` runs those whose file name contains TEXT.

use std::path::PathBuf;
use std::process::ExitCode;

use pexi_test_support::conformance::{self, guest};

const USAGE: &str =
    "usage: pexi-conformance guest --name NAME [--scenarios DIR] [--only TEXT] -- DRIVER [ARGS...]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("guest") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut name = None;
    let mut dir = pexi_test_support::repo_root().join("protocol/conformance/guest");
    let mut only = None;
    let mut command = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = args.next(),
            "--scenarios" => dir = args.next().map(PathBuf::from).unwrap_or(dir),
            "--only" => only = args.next(),
            "--" => command.extend(args.by_ref()),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(name), false) = (name, command.is_empty()) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let driver = guest::Driver { name, command };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pexi-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(&driver, &dir, only.as_deref())) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("pexi-conformance: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(
    driver: &guest::Driver,
    dir: &std::path::Path,
    only: Option<&str>,
) -> Result<bool, String> {
    let files = conformance::scenario_files(dir)?;
    let workdir = std::env::temp_dir().join(format!("pexi-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let mut failed = Vec::new();
    let mut ran = 0;
    for file in &files {
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if only.is_some_and(|text| !name.contains(text)) {
            continue;
        }
        ran += 1;
        let scenario = conformance::load(file)?;
        match guest::run(driver, &scenario, &workdir).await {
            Ok(()) => println!("ok    {} {name}", driver.name),
            Err(why) => {
                println!(
                    "FAIL  {} {name} ({}): {why}",
                    driver.name, scenario["covers"]
                );
                failed.push(name);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&workdir);
    println!(
        "{}: {} of {ran} guest scenarios passed{}",
        driver.name,
        ran - failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", failed.join(", "))
        }
    );
    Ok(failed.is_empty() && ran > 0)
}
