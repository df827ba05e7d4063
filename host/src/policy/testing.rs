//! Runs a bundle's `test_*` rules, in OPA's `opa test` layout: every top-level rule whose name starts with
//! `test_` in a `*_test.rego` file is a test; it passes when it evaluates to `true`.

use super::PolicyError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// `package.rule`, e.g. `pexi.http_test.test_methods`.
    pub name: String,
    pub passed: bool,
    /// Why it failed: the value it had instead of `true`, or the evaluation error.
    pub detail: Option<String>,
}

/// Evaluates every test of `tests` against `engine` (which holds the modules and data under test).
pub fn run_tests(
    engine: &regorus::Engine,
    tests: &[(String, String)],
) -> Result<Vec<TestOutcome>, PolicyError> {
    let mut with_tests = engine.clone();
    let mut names = Vec::new();
    for (file, text) in tests {
        with_tests
            .add_policy(file.clone(), text.clone())
            .map_err(|err| PolicyError {
                file: file.clone(),
                message: err.to_string(),
            })?;
        let package = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("package "))
            .map(|p| p.trim().to_string())
            .ok_or_else(|| PolicyError {
                file: file.clone(),
                message: "no package declaration".into(),
            })?;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("test_") {
                let rule: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let name = format!("{package}.test_{rule}");
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    let mut outcomes = Vec::new();
    for name in names {
        let mut engine = with_tests.clone();
        engine.set_input(regorus::Value::new_object());
        let (passed, detail) = match engine.eval_rule(format!("data.{name}")) {
            Ok(value) if value == regorus::Value::from(true) => (true, None),
            Ok(regorus::Value::Undefined) => (false, Some("undefined".to_string())),
            Ok(value) => (
                false,
                Some(format!(
                    "evaluated to {}",
                    value.to_json_str().unwrap_or_default()
                )),
            ),
            Err(err) => (false, Some(err.to_string())),
        };
        outcomes.push(TestOutcome {
            name,
            passed,
            detail,
        });
    }
    Ok(outcomes)
}
