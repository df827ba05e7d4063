//! The commands for the person at the PEP (docs/approvals.md): `pexi approve` answers questions with single
//! keys, `pexi ui` prints the dashboard's address, `pexi policy list` shows the entries in force. They talk
//! to a running PEP through its control socket, except `policy list`, which loads the bundle itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::control::client::Client;

fn load(config: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|err| {
        eprintln!("pexi: {err}");
        ExitCode::from(2)
    })
}

fn socket_of(config: &Config) -> PathBuf {
    config.pep.control.socket_path(&config.pep.audit)
}

/// The config (for the control socket's path) and a one-thread runtime to talk to it.
fn config_and_runtime(
    config: Option<PathBuf>,
) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = load(config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("pexi: cannot start the runtime: {err}");
            ExitCode::from(2)
        })?;
    Ok((config, runtime))
}

/// Text a guest chose (a URL, its HELLO name, a reason naming its host) made safe for a terminal: control
/// characters, escape sequences and line breaks are shown escaped, never sent.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            // Control characters (C0 and C1), and the bidirectional controls that reorder what is shown.
            if c.is_control()
                || ('\u{200b}'..='\u{200f}').contains(&c)
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
            {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// `pexi ui`: the dashboard's URL (with this start's token) from the running PEP.
pub fn ui(config: Option<PathBuf>) -> ExitCode {
    let (config, runtime) = match config_and_runtime(config) {
        Ok(both) => both,
        Err(code) => return code,
    };
    let client = Client::new(&socket_of(&config), "control");
    match runtime.block_on(client.get("/api/dashboard")) {
        Ok((200, body)) => {
            println!("{}", body["url"].as_str().unwrap_or_default());
            eprintln!(
                "pexi: open this address in a browser on this machine; it holds a token that changes each time the PEP starts"
            );
            ExitCode::SUCCESS
        }
        Ok((_, body)) => {
            eprintln!(
                "pexi: {}",
                body["error"]["message"].as_str().unwrap_or("no dashboard")
            );
            ExitCode::from(1)
        }
        Err(err) => {
            eprintln!("pexi: {err}");
            ExitCode::from(2)
        }
    }
}

/// `pexi policy list`: every allow and deny entry in force, with its source.
pub fn policy_list(config: Option<PathBuf>, as_json: bool) -> ExitCode {
    let config = match load(config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let bundle = match crate::policy::Bundle::load_with(
        &config.policy_root,
        &config.pep.policy.allow,
        &config.pep.policy.deny,
        &crate::pipeline::approvals_of(&config),
    ) {
        Ok(bundle) => bundle,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    if as_json {
        let _ = writeln!(
            out,
            "{}",
            json!({"revision": bundle.revision, "entries": bundle.listed})
        );
        return ExitCode::SUCCESS;
    }
    if bundle.listed.is_empty() {
        let _ = writeln!(out, "no entries: everything is denied");
    }
    for listed in &bundle.listed {
        let entry = serde_json::to_string(&listed.entry).unwrap_or_default();
        let _ = writeln!(out, "{:<5}  {entry}  ({})", listed.list, listed.source);
    }
    ExitCode::SUCCESS
}

/// Puts the terminal into single-key mode (no line editing, no echo) and back when dropped. Signals stay
/// on: Ctrl-C still interrupts, and the prompt restores the terminal before it exits.
struct SingleKeys(Option<nix::sys::termios::Termios>);

impl SingleKeys {
    fn new() -> SingleKeys {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return SingleKeys(None);
        };
        let mut raw = saved.clone();
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return SingleKeys(None);
        }
        SingleKeys(Some(saved))
    }
}

impl Drop for SingleKeys {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

const KEYS: &str = "a allow once · A allow always · p allow always (this method under the path shown) · d deny once · \
                    D deny always · P deny always (path) · n next · q quit";

/// `pexi approve`: shows the waiting questions one at a time and answers the shown one with a key.
pub fn approve(config: Option<PathBuf>) -> ExitCode {
    let (config, runtime) = match config_and_runtime(config) {
        Ok(both) => both,
        Err(code) => return code,
    };
    let socket = socket_of(&config);
    let client = Client::new(&socket, "terminal");
    let keys = SingleKeys::new();
    let code = runtime.block_on(prompt(&client, &socket));
    drop(keys);
    // The key reader is blocked in a read of the terminal: do not wait for it.
    runtime.shutdown_background();
    code
}

async fn prompt(client: &Client, socket: &Path) -> ExitCode {
    use tokio::io::AsyncReadExt;
    let (status, body) = match client.get("/api/status").await {
        Ok(found) => found,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    if status != 200 {
        eprintln!("pexi: the control socket answered {status}: {body}");
        return ExitCode::from(2);
    }
    println!(
        "pexi approve: answering for the PEP on {} (approvals {}); waiting for questions. q quits.",
        socket.display(),
        if body["approvals"]["enabled"] == true {
            "on"
        } else {
            "off in its config: only a policy of your own asks"
        }
    );
    let (keys, mut pressed) = tokio::sync::mpsc::channel::<u8>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdin.read(&mut byte).await {
            if keys.send(byte[0]).await.is_err() {
                break;
            }
        }
    });
    let mut shown: Option<Value> = None;
    let mut skipped: Vec<String> = Vec::new();
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = poll.tick() => {
                let waiting = match client.get("/api/questions").await {
                    Ok((200, body)) => body["questions"].as_array().cloned().unwrap_or_default(),
                    Ok((status, body)) => {
                        eprintln!("pexi: the control socket answered {status}: {body}");
                        return ExitCode::from(2);
                    }
                    Err(err) => {
                        eprintln!("pexi: {err}");
                        return ExitCode::from(2);
                    }
                };
                let ids: Vec<&str> = waiting.iter().filter_map(|q| q["id"].as_str()).collect();
                skipped.retain(|id| ids.contains(&id.as_str()));
                if skipped.len() == ids.len() {
                    skipped.clear();
                }
                let next = waiting
                    .iter()
                    .find(|q| !skipped.iter().any(|s| q["id"] == s.as_str()))
                    .cloned();
                let changed = next.as_ref().map(|q| (&q["id"], &q["waiting"]))
                    != shown.as_ref().map(|q| (&q["id"], &q["waiting"]));
                if changed {
                    if let Some(question) = &next {
                        show(question, waiting.len());
                    } else if shown.is_some() {
                        println!("no question is waiting.");
                    }
                }
                shown = next;
            }
            key = pressed.recv() => {
                let Some(key) = key else { return ExitCode::SUCCESS };
                if key == b'q' {
                    return ExitCode::SUCCESS;
                }
                let Some(question) = shown.clone() else { continue };
                let id = question["id"].as_str().unwrap_or_default().to_string();
                let prefix = path_prefix(question["path"].as_str().unwrap_or("/"));
                let body = match key {
                    b'a' => json!({"answer": "allow_once"}),
                    b'A' => json!({"answer": "allow_always"}),
                    b'p' => json!({"answer": "allow_always", "path_prefix": prefix}),
                    b'd' => json!({"answer": "deny_once"}),
                    b'D' => json!({"answer": "deny_always"}),
                    b'P' => json!({"answer": "deny_always", "path_prefix": prefix}),
                    b'n' => {
                        skipped.push(id);
                        shown = None;
                        poll.reset_immediately();
                        continue;
                    }
                    _ => continue,
                };
                match client.post(&format!("/api/questions/{id}/answer"), &body).await {
                    Ok((200, done)) => println!(
                        "-> {} {}",
                        done["answer"].as_str().unwrap_or_default(),
                        printable(question["url"].as_str().unwrap_or_default())
                    ),
                    Ok((_, refused)) => println!(
                        "-> not answered: {}",
                        printable(refused["error"]["message"].as_str().unwrap_or_default())
                    ),
                    Err(err) => {
                        eprintln!("pexi: {err}");
                        return ExitCode::from(2);
                    }
                }
                shown = None;
                poll.reset_immediately();
            }
            _ = tokio::signal::ctrl_c() => return ExitCode::from(130),
        }
    }
}

/// The prefix a path answer covers: the request's folder (`/v1/chat/completions` → `/v1/chat/`).
fn path_prefix(path: &str) -> String {
    match path.rfind('/') {
        Some(cut) if cut > 0 => path[..=cut].to_string(),
        _ => "/".to_string(),
    }
}

fn show(question: &Value, waiting: usize) {
    let text = |key: &str| printable(question[key].as_str().unwrap_or_default());
    let reasons: Vec<String> = question["reasons"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).map(printable).collect())
        .unwrap_or_default();
    let now = crate::activity::now_ms();
    let left = question["deadline_ms"]
        .as_u64()
        .unwrap_or(now)
        .saturating_sub(now)
        / 1000;
    println!();
    println!(
        "question {} of {waiting} waiting: {} {}",
        text("id"),
        text("method"),
        text("url")
    );
    println!(
        "  {}guest {} · {} · {} request(s) waiting · denied unanswered in {left} s",
        match text("vm").as_str() {
            "" => String::new(),
            vm => format!("vm {vm} · "),
        },
        text("guest"),
        reasons.join("; "),
        question["waiting"]
    );
    println!(
        "  p/P cover {} under {}",
        text("method"),
        printable(&path_prefix(question["path"].as_str().unwrap_or("/")))
    );
    println!("  {KEYS}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_cannot_drive_the_terminal() {
        let shown = printable("evil\u{1b}[2J\r\nfake: allowed\u{9b}31m\u{7}\u{202e}moc.elgoog");
        assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{shown:?}"
        );
        assert!(shown.contains("\\u{1b}") && shown.contains("\\u{9b}"));
        assert_eq!(
            printable("https://api.example.com/v1?q=ü"),
            "https://api.example.com/v1?q=ü"
        );
    }

    #[test]
    fn a_path_answer_covers_the_requests_folder() {
        assert_eq!(path_prefix("/v1/chat/completions"), "/v1/chat/");
        assert_eq!(path_prefix("/"), "/");
        assert_eq!(path_prefix("/x"), "/");
    }
}
