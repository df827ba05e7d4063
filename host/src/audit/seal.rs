//! Signatures that make the log checkable by someone who can read it but not the PEP's key.
//!
//! The hash chain shows that no line was changed *unless the whole rest of the chain was recomputed*, which
//! anyone who can write the file can do. So the PEP also signs (Ed25519, `ring`):
//!
//! - **every write group**: the last line of each group the writer writes ends with
//!   `,"sig":"<128 hex digits>"}`, a signature over the line as it would be without that field (the same
//!   bytes with `}` in place of the suffix). Through the chain (each line's `prev` is the digest of the one
//!   before) it covers the group's earlier lines too. An edited, inserted, renumbered or re-chained record
//!   breaks the chain or the group's signature, so `pexi audit verify` names the line, or the group's
//!   first line;
//! - **checkpoints**, in a file of their own kept apart from the log (not matched by `<path>*`): every
//!   `checkpoint_ms` or `checkpoint_records`, at rotation, at start and at shutdown, one signed line naming the
//!   log's first and last `seq`, the last line's digest and the files with their first `seq`, chained to the
//!   previous checkpoint. They catch what per-record signatures cannot: records or whole files removed
//!   from the end or the start of the log.
//!
//! The signing key is a PKCS#8 file in the host-only keys folder (`audit-signing.pk8`, 0600); the public key
//! beside it (`audit-signing.pub`, hex) is what an auditor needs. There is no key evolution: an intruder who
//! obtains the key can sign forged records, past ones included; checkpoints shipped off the machine as they
//! are written are the defence against that (docs/audit.md says so).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

pub const SIGNING_KEY_FILE: &str = "audit-signing.pk8";
pub const PUBLIC_KEY_FILE: &str = "audit-signing.pub";
/// `,"sig":"` + 128 hex digits + `"}`.
const SIG_SUFFIX_LEN: usize = 8 + 128 + 2;

pub struct Sealer {
    key: Ed25519KeyPair,
    public_hex: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({})", self.public_hex)
    }
}

impl Sealer {
    /// The key in `dir`, or a new one created there (the folder 0700, the private key 0600).
    pub fn load_or_create(dir: &Path) -> std::io::Result<Sealer> {
        prepare_keys_dir(dir)?;
        let private = dir.join(SIGNING_KEY_FILE);
        let pkcs8 = match std::fs::read(&private) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let document = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| std::io::Error::other("cannot generate an Ed25519 key"))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&private)?;
                file.write_all(document.as_ref())?;
                file.sync_all()?;
                document.as_ref().to_vec()
            }
            Err(err) => return Err(err),
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|err| {
            std::io::Error::other(format!(
                "{}: not an Ed25519 PKCS#8 key ({err})",
                private.display()
            ))
        })?;
        let public_hex = hex::encode(key.public_key().as_ref());
        let public = dir.join(PUBLIC_KEY_FILE);
        if std::fs::read_to_string(&public)
            .map(|t| t.trim().to_string())
            .ok()
            != Some(public_hex.clone())
        {
            std::fs::write(&public, format!("{public_hex}\n"))?;
        }
        Ok(Sealer { key, public_hex })
    }

    pub fn public_hex(&self) -> &str {
        &self.public_hex
    }

    /// Turns `line` (one JSON object, no newline) into its signed form: `,"sig":"…"}` replaces the final `}`.
    pub fn seal(&self, line: &mut Vec<u8>) {
        self.seal_from(line, 0);
    }

    /// [`Sealer::seal`] for the line that starts at `start` and runs to the end of `buffer` (the writer's
    /// pending group), in place.
    pub fn seal_from(&self, line: &mut Vec<u8>, start: usize) {
        let signature = self.key.sign(&line[start..]);
        line.pop();
        line.extend_from_slice(b",\"sig\":\"");
        line.extend_from_slice(hex::encode(signature.as_ref()).as_bytes());
        line.extend_from_slice(b"\"}");
    }
}

/// Creates the keys folder owner-only, and refuses one that others may read or write.
pub fn prepare_keys_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{}: the audit keys folder is not a folder",
            dir.display()
        )));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(std::io::Error::other(format!(
            "{}: the audit keys folder belongs to another user",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Why a line's signature does not hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Unsealed {
    /// The line has no `sig` at its end.
    Missing,
    /// It has one, and it is not the key's signature of this line.
    Invalid,
}

/// Checks a signed line against a public key (32 bytes).
pub fn check(line: &[u8], public_key: &[u8]) -> Result<(), Unsealed> {
    if line.len() < SIG_SUFFIX_LEN + 2 {
        return Err(Unsealed::Missing);
    }
    let (body, suffix) = line.split_at(line.len() - SIG_SUFFIX_LEN);
    let Some(hex_sig) = suffix
        .strip_prefix(b",\"sig\":\"")
        .and_then(|rest| rest.strip_suffix(b"\"}"))
    else {
        return Err(Unsealed::Missing);
    };
    let signature = hex::decode(hex_sig).map_err(|_| Unsealed::Missing)?;
    let mut message = body.to_vec();
    message.push(b'}');
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&message, &signature)
        .map_err(|_| Unsealed::Invalid)
}

/// Reads a public key file (hex, as the PEP writes it).
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let key = hex::decode(text.trim())
        .map_err(|_| format!("{}: not a hex public key", path.display()))?;
    if key.len() != 32 {
        return Err(format!(
            "{}: an Ed25519 public key is 32 bytes",
            path.display()
        ));
    }
    Ok(key)
}

/// Where the keys of the log at `log` live by default: a host-only `keys` folder beside it, which the
/// log's `<path>*` glob does not match.
pub fn default_keys_dir(log: &Path) -> PathBuf {
    log.parent().unwrap_or(Path::new(".")).join("keys")
}

/// Where its checkpoints go by default: `checkpoints/<name>.checkpoints` beside it, a folder of its own.
pub fn default_checkpoint_path(log: &Path) -> PathBuf {
    let name = log
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "audit".into());
    log.parent()
        .unwrap_or(Path::new("."))
        .join("checkpoints")
        .join(format!("{name}.checkpoints"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_line_checks_and_any_change_breaks_it() {
        let dir = std::env::temp_dir().join(format!("pexi-seal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sealer = Sealer::load_or_create(&dir).expect("key");
        let public = read_public_key(&dir.join(PUBLIC_KEY_FILE)).expect("public");
        let mut line = br#"{"seq":1,"kind":"decision","allow":false}"#.to_vec();
        sealer.seal(&mut line);
        assert_eq!(check(&line, &public), Ok(()));
        let edited = String::from_utf8(line.clone())
            .expect("utf8")
            .replace("false", "true ");
        assert_eq!(check(edited.as_bytes(), &public), Err(Unsealed::Invalid));
        assert_eq!(check(br#"{"seq":1}"#, &public), Err(Unsealed::Missing));
        // The same key is found again.
        let again = Sealer::load_or_create(&dir).expect("key");
        assert_eq!(again.public_hex(), sealer.public_hex());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
