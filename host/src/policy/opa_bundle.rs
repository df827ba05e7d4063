//! OPA-format bundles (docs/fleet.md): a gzipped tarball of `*.rego` modules, `data.json` documents, a
//! `.manifest` and a `.signatures.json`, as `opa build` makes them and bundle servers serve them. This
//! reads, verifies, builds and signs them; nothing here does I/O beyond the files `build` is given (the
//! download is `crate::bundle_sync`'s).
//!
//! Verification follows OPA's bundle-signing specification: `.signatures.json` holds exactly one JWT,
//! signed with the configured key and algorithm (the token's own `alg` must be that one), whose payload
//! lists every file of the bundle but `.signatures.json` with its digest; a file the payload does not
//! list, or a listed file that is missing, refuses the bundle. `data.json` and `.manifest` are digested
//! as OPA does, over a canonical form of their JSON (objects' keys sorted, numbers as written), so a
//! bundle signed by `opa sign` verifies here and one signed by `pexi policy bundle sign` verifies in OPA.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::bundle::{read_data_files, read_rego_files, DataFile};
use super::entries::Entry;

/// The signatures file, which the signature does not cover.
pub const SIGNATURES: &str = ".signatures.json";
const MANIFEST: &str = ".manifest";

/// How large a bundle may be: compressed, unpacked, and in files.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_unpacked_bytes: u64,
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 16 << 20,
            max_unpacked_bytes: 64 << 20,
            max_files: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("not a bundle: {0}")]
    Archive(String),
    #[error("the bundle is not signed (it has no {SIGNATURES})")]
    Unsigned,
    #[error("{SIGNATURES}: {0}")]
    Signature(String),
    #[error("{0}: its digest does not match the one the signature lists")]
    Digest(String),
    #[error("{0}: in the bundle but not covered by its signature")]
    NotCovered(String),
    #[error("{0}: listed by the signature but missing from the bundle")]
    Missing(String),
    #[error("{0}: {1}")]
    File(String, String),
}

/// A bundle as read from its archive.
#[derive(Clone, Debug)]
pub struct OpaBundle {
    /// Every file but `.signatures.json`, by its path in the bundle (no leading `/`).
    pub files: BTreeMap<String, Vec<u8>>,
    pub signatures: Option<Vec<u8>>,
    /// `.manifest`'s `revision`, or "" without one.
    pub manifest_revision: String,
    /// `sha256:` and the hex digest of the archive as it came.
    pub digest: String,
}

/// The key a bundle's signature must verify with (`[pep.policy.bundle]`).
#[derive(Clone)]
pub struct VerificationKey {
    pub algorithm: jsonwebtoken::Algorithm,
    pub key: jsonwebtoken::DecodingKey,
    /// When set, the token must name this key (`kid`, or the payload's deprecated `keyid`).
    pub key_id: Option<String>,
    /// Must equal the payload's `scope` (both empty by default), as in OPA.
    pub scope: String,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The algorithms bundle signatures may use: OPA's asymmetric ones (a shared HMAC secret would let every
/// host that verifies also sign).
pub fn algorithm(name: &str) -> Result<jsonwebtoken::Algorithm, String> {
    use jsonwebtoken::Algorithm::*;
    Ok(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        _ => {
            return Err(format!(
                "algorithm {name:?}: one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
            ))
        }
    })
}

/// Which kind of key an algorithm takes.
enum KeyKind {
    Rsa,
    Ec,
    Ed,
}

fn key_kind(algorithm: jsonwebtoken::Algorithm) -> Result<KeyKind, String> {
    use jsonwebtoken::Algorithm::*;
    match algorithm {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Ok(KeyKind::Rsa),
        ES256 | ES384 => Ok(KeyKind::Ec),
        EdDSA => Ok(KeyKind::Ed),
        other => Err(format!("algorithm {other:?} is not allowed for bundles")),
    }
}

impl VerificationKey {
    /// From a PEM public key (`PUBLIC KEY`, or `RSA PUBLIC KEY` for the RSA algorithms).
    pub fn from_pem(
        pem: &[u8],
        algorithm: jsonwebtoken::Algorithm,
        key_id: Option<String>,
        scope: String,
    ) -> Result<VerificationKey, String> {
        use jsonwebtoken::DecodingKey;
        let key = match key_kind(algorithm)? {
            KeyKind::Rsa => DecodingKey::from_rsa_pem(pem),
            KeyKind::Ec => DecodingKey::from_ec_pem(pem),
            KeyKind::Ed => DecodingKey::from_ed_pem(pem),
        }
        .map_err(|err| format!("not a {algorithm:?} public key: {err}"))?;
        Ok(VerificationKey {
            algorithm,
            key,
            key_id,
            scope,
        })
    }
}

/// A private key that signs bundles (`pexi policy bundle sign`).
pub struct SigningKey {
    pub algorithm: jsonwebtoken::Algorithm,
    pub key: jsonwebtoken::EncodingKey,
    pub key_id: Option<String>,
    pub scope: String,
}

impl SigningKey {
    /// From a PEM private key (PKCS#8 `PRIVATE KEY`; `RSA PRIVATE KEY` and `EC PRIVATE KEY` too).
    pub fn from_pem(
        pem: &[u8],
        algorithm: jsonwebtoken::Algorithm,
        key_id: Option<String>,
        scope: String,
    ) -> Result<SigningKey, String> {
        use jsonwebtoken::EncodingKey;
        let key = match key_kind(algorithm)? {
            KeyKind::Rsa => EncodingKey::from_rsa_pem(pem),
            KeyKind::Ec => EncodingKey::from_ec_pem(pem),
            KeyKind::Ed => EncodingKey::from_ed_pem(pem),
        }
        .map_err(|err| format!("not a {algorithm:?} private key: {err}"))?;
        Ok(SigningKey {
            algorithm,
            key,
            key_id,
            scope,
        })
    }
}

/// `.signatures.json`.
#[derive(Serialize, Deserialize)]
struct SignaturesFile {
    signatures: Vec<String>,
}

/// The JWT's payload.
#[derive(Serialize, Deserialize)]
struct Payload {
    files: Vec<FileDigest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keyid: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    scope: String,
}

#[derive(Serialize, Deserialize)]
struct FileDigest {
    name: String,
    hash: String,
    algorithm: String,
}

impl OpaBundle {
    /// Reads a `.tar.gz` bundle within `limits`: regular files only, no path leaving the bundle.
    pub fn parse(archive: &[u8], limits: Limits) -> Result<OpaBundle, BundleError> {
        if archive.len() as u64 > limits.max_bytes {
            return Err(BundleError::Archive(format!(
                "{} bytes, over the limit of {}",
                archive.len(),
                limits.max_bytes
            )));
        }
        let unpacked = flate2::read::GzDecoder::new(archive).take(limits.max_unpacked_bytes + 1);
        let mut tar = tar::Archive::new(unpacked);
        let mut files = BTreeMap::new();
        let mut signatures = None;
        let mut total = 0u64;
        let entries = tar
            .entries()
            .map_err(|err| BundleError::Archive(err.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|err| BundleError::Archive(err.to_string()))?;
            let kind = entry.header().entry_type();
            let raw_path = entry
                .path()
                .map_err(|err| BundleError::Archive(err.to_string()))?
                .into_owned();
            if kind.is_dir() {
                continue;
            }
            let name = bundle_path(&raw_path)?;
            if !kind.is_file() {
                return Err(BundleError::File(
                    name,
                    "not a regular file (links and devices are refused)".into(),
                ));
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|err| BundleError::Archive(format!("{name}: {err}")))?;
            total += bytes.len() as u64;
            if total > limits.max_unpacked_bytes {
                return Err(BundleError::Archive(format!(
                    "over {} bytes unpacked",
                    limits.max_unpacked_bytes
                )));
            }
            if name == SIGNATURES {
                signatures = Some(bytes);
                continue;
            }
            if files.insert(name.clone(), bytes).is_some() {
                return Err(BundleError::File(name, "appears twice".into()));
            }
            if files.len() > limits.max_files {
                return Err(BundleError::Archive(format!(
                    "more than {} files",
                    limits.max_files
                )));
            }
        }
        let manifest_revision = match files.get(MANIFEST) {
            Some(bytes) => serde_json::from_slice::<serde_json::Value>(bytes)
                .map_err(|err| BundleError::File(MANIFEST.into(), err.to_string()))?["revision"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            None => String::new(),
        };
        Ok(OpaBundle {
            files,
            signatures,
            manifest_revision,
            digest: format!("sha256:{}", hex::encode(sha2::Sha256::digest(archive))),
        })
    }

    /// Checks the signature as OPA does: one JWT, made with `key`, listing every file with its digest.
    pub fn verify(&self, key: &VerificationKey) -> Result<(), BundleError> {
        let signatures = self.signatures.as_ref().ok_or(BundleError::Unsigned)?;
        let file: SignaturesFile = serde_json::from_slice(signatures)
            .map_err(|err| BundleError::Signature(err.to_string()))?;
        let [token] = file.signatures.as_slice() else {
            return Err(BundleError::Signature(format!(
                "{} tokens; exactly one is expected",
                file.signatures.len()
            )));
        };
        let header = jsonwebtoken::decode_header(token)
            .map_err(|err| BundleError::Signature(format!("the token: {err}")))?;
        if header.alg != key.algorithm {
            return Err(BundleError::Signature(format!(
                "signed with {:?}, but {:?} is configured",
                header.alg, key.algorithm
            )));
        }
        let mut validation = jsonwebtoken::Validation::new(key.algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let payload = jsonwebtoken::decode::<Payload>(token, &key.key, &validation)
            .map_err(|err| BundleError::Signature(format!("the signature does not verify: {err}")))?
            .claims;
        if let Some(wanted) = &key.key_id {
            let named = header.kid.as_ref().or(payload.keyid.as_ref());
            if named != Some(wanted) {
                return Err(BundleError::Signature(format!(
                    "signed by key {named:?}, not {wanted:?}"
                )));
            }
        }
        if payload.scope != key.scope {
            return Err(BundleError::Signature(format!(
                "scope {:?}, but {:?} is configured",
                payload.scope, key.scope
            )));
        }
        let mut listed: BTreeMap<&str, &FileDigest> = BTreeMap::new();
        for file in &payload.files {
            listed.insert(file.name.trim_start_matches('/'), file);
        }
        for (name, bytes) in &self.files {
            let Some(digest) = listed.remove(name.as_str()) else {
                return Err(BundleError::NotCovered(name.clone()));
            };
            let computed = file_digest(name, bytes, &digest.algorithm)?;
            if !computed.eq_ignore_ascii_case(&digest.hash) {
                return Err(BundleError::Digest(name.clone()));
            }
        }
        if let Some(name) = listed.keys().next() {
            return Err(BundleError::Missing(name.to_string()));
        }
        Ok(())
    }

    /// The Rego modules (tests included), by path.
    pub fn rego_files(&self) -> Result<Vec<(String, String)>, BundleError> {
        self.files
            .iter()
            .filter(|(name, _)| name.ends_with(".rego"))
            .map(|(name, bytes)| {
                String::from_utf8(bytes.clone())
                    .map(|text| (name.clone(), text))
                    .map_err(|_| BundleError::File(name.clone(), "not UTF-8".into()))
            })
            .collect()
    }

    /// The allow and deny entries of the bundle's data (`data.pexi.allow`, `data.pexi.deny`), validated.
    /// The data may hold nothing else: the rest of `data.pexi` is the PEP's (the index, approvals), and
    /// the shipped policy reads no other document. Files the PEP cannot use (Wasm, plans, YAML data)
    /// refuse the bundle rather than being ignored.
    pub fn lists(&self) -> Result<(Vec<Entry>, Vec<Entry>), BundleError> {
        let mut allow = Vec::new();
        let mut deny = Vec::new();
        for (name, bytes) in &self.files {
            let base = name.rsplit('/').next().unwrap_or(name);
            if name.ends_with(".rego") || name == MANIFEST {
                continue;
            }
            if base != "data.json" {
                return Err(BundleError::File(
                    name.clone(),
                    "not something a pexi bundle holds (*.rego, data.json, .manifest)".into(),
                ));
            }
            let dir = name.strip_suffix("data.json").unwrap_or_default();
            let value: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|err| BundleError::File(name.clone(), err.to_string()))?;
            // Where the document lands in `data`: its folder's path.
            let lists = match dir.trim_end_matches('/') {
                "pexi" => value,
                "" => {
                    let mut object = value
                        .as_object()
                        .cloned()
                        .ok_or_else(|| BundleError::File(name.clone(), "not an object".into()))?;
                    let pexi = object
                        .remove("pexi")
                        .unwrap_or_else(|| serde_json::json!({}));
                    if let Some(key) = object.keys().next() {
                        return Err(BundleError::File(
                            name.clone(),
                            format!("data.{key}: a pexi bundle's data is data.pexi.allow and data.pexi.deny only"),
                        ));
                    }
                    pexi
                }
                other => {
                    return Err(BundleError::File(
                        name.clone(),
                        format!(
                        "data.{}: a pexi bundle's data is data.pexi.allow and data.pexi.deny only",
                        other.replace('/', ".")
                    ),
                    ))
                }
            };
            let lists: DataFile = serde_json::from_value(lists).map_err(|err| {
                BundleError::File(
                    name.clone(),
                    format!("{err} (data.pexi holds allow and deny entries only)"),
                )
            })?;
            allow.extend(lists.allow);
            deny.extend(lists.deny);
        }
        Ok((allow, deny))
    }

    /// A bundle from a policy folder in pexi's layout (`*.rego` anywhere, `data/*.json` entry files):
    /// the modules at their paths, the entries merged into `pexi/data.json`, a `.manifest` with
    /// `revision` (by default the digest of the files, so the same files get the same revision) and the
    /// `pexi` root. Returns the archive and its revision. Unsigned: sign it with [`OpaBundle::sign`].
    pub fn build(dir: &Path, revision: Option<&str>) -> Result<(Vec<u8>, String), String> {
        let mut files: BTreeMap<String, Vec<u8>> = read_rego_files(dir)
            .map_err(|err| err.to_string())?
            .into_iter()
            .map(|(name, text)| (name, text.into_bytes()))
            .collect();
        if !files.keys().any(|name| !name.ends_with("_test.rego")) {
            return Err(format!("{}: no .rego policy files", dir.display()));
        }
        let mut allow = Vec::new();
        let mut deny = Vec::new();
        for (_, file) in read_data_files(&dir.join("data")).map_err(|err| err.to_string())? {
            allow.extend(file.allow);
            deny.extend(file.deny);
        }
        let data = serde_json::json!({"allow": allow, "deny": deny});
        files.insert(
            "pexi/data.json".into(),
            serde_json::to_vec_pretty(&data).map_err(|err| err.to_string())?,
        );
        let revision = match revision {
            Some(revision) => revision.to_string(),
            None => {
                let mut hash = sha2::Sha256::new();
                for (name, bytes) in &files {
                    hash.update(name.as_bytes());
                    hash.update([0]);
                    hash.update(bytes);
                }
                hex::encode(hash.finalize())
            }
        };
        let manifest = serde_json::json!({"revision": revision, "roots": ["pexi"]});
        files.insert(
            MANIFEST.into(),
            serde_json::to_vec_pretty(&manifest).map_err(|err| err.to_string())?,
        );
        Ok((pack(&files, None)?, revision))
    }

    /// The same archive with a `.signatures.json` (any old one replaced) that lists every other file.
    pub fn sign(archive: &[u8], key: &SigningKey, limits: Limits) -> Result<Vec<u8>, String> {
        let bundle = OpaBundle::parse(archive, limits).map_err(|err| err.to_string())?;
        let files = bundle
            .files
            .iter()
            .map(|(name, bytes)| {
                Ok(FileDigest {
                    name: name.clone(),
                    hash: file_digest(name, bytes, "SHA-256").map_err(|err| err.to_string())?,
                    algorithm: "SHA-256".into(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let payload = Payload {
            files,
            keyid: None,
            scope: key.scope.clone(),
        };
        let mut header = jsonwebtoken::Header::new(key.algorithm);
        header.kid = key.key_id.clone();
        let token = jsonwebtoken::encode(&header, &payload, &key.key)
            .map_err(|err| format!("signing: {err}"))?;
        let signatures = serde_json::to_vec(&SignaturesFile {
            signatures: vec![token],
        })
        .map_err(|err| err.to_string())?;
        pack(&bundle.files, Some(&signatures))
    }
}

/// A `.tar.gz` of `files` (and the signatures), in path order, with fixed metadata so the same
/// files make the same archive.
fn pack(files: &BTreeMap<String, Vec<u8>>, signatures: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let all = signatures
        .map(|bytes| (SIGNATURES, bytes))
        .into_iter()
        .chain(
            files
                .iter()
                .map(|(name, bytes)| (name.as_str(), bytes.as_slice())),
        );
    for (name, bytes) in all {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, bytes)
            .map_err(|err| format!("{name}: {err}"))?;
    }
    let gz = tar.into_inner().map_err(|err| err.to_string())?;
    gz.finish().map_err(|err| err.to_string())
}

/// A tar entry's path as a bundle path: `/`-separated, relative, nothing that climbs out.
fn bundle_path(path: &Path) -> Result<String, BundleError> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(
                part.to_str()
                    .ok_or_else(|| BundleError::Archive(format!("{path:?}: not UTF-8")))?
                    .to_string(),
            ),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(BundleError::Archive(format!(
                    "{}: a path that leaves the bundle",
                    path.display()
                )))
            }
        }
    }
    if parts.is_empty() {
        return Err(BundleError::Archive("an entry without a name".into()));
    }
    Ok(parts.join("/"))
}

/// A file's digest as OPA computes it: of the bytes, or for `data.json` and `.manifest` of their JSON in
/// canonical form.
fn file_digest(name: &str, bytes: &[u8], algorithm: &str) -> Result<String, BundleError> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let canonical;
    let input: &[u8] = if base == "data.json" || base == MANIFEST {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| BundleError::File(name.into(), "not UTF-8".into()))?;
        canonical = canonical_json(text).map_err(|err| BundleError::File(name.into(), err))?;
        &canonical
    } else {
        bytes
    };
    let digest = match algorithm {
        "SHA-224" => sha2::Sha224::digest(input).to_vec(),
        "SHA-256" => sha2::Sha256::digest(input).to_vec(),
        "SHA-384" => sha2::Sha384::digest(input).to_vec(),
        "SHA-512" => sha2::Sha512::digest(input).to_vec(),
        "SHA-512-224" => sha2::Sha512_224::digest(input).to_vec(),
        "SHA-512-256" => sha2::Sha512_256::digest(input).to_vec(),
        "MD5" | "SHA-1" => {
            return Err(BundleError::Signature(format!(
                "{name}: {algorithm} is too weak to rely on; sign with SHA-256"
            )))
        }
        other => {
            return Err(BundleError::Signature(format!(
                "{name}: unknown digest algorithm {other:?}"
            )))
        }
    };
    Ok(hex::encode(digest))
}

/// The bytes OPA digests for a structured file: `{` key `:` value `,` ... `}` with keys sorted, arrays in
/// order, strings and keys encoded as Go's `encoding/json` does without HTML escaping, numbers exactly as
/// written (OPA reads them as `json.Number`).
pub fn canonical_json(text: &str) -> Result<Vec<u8>, String> {
    let mut parser = JsonParser {
        bytes: text.as_bytes(),
        at: 0,
    };
    let value = parser.value(0)?;
    parser.space();
    if parser.at != parser.bytes.len() {
        return Err(format!("JSON: trailing characters at byte {}", parser.at));
    }
    let mut out = Vec::new();
    walk(&value, &mut out);
    Ok(out)
}

enum Json {
    Literal(String),
    Str(String),
    Array(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

fn walk(value: &Json, out: &mut Vec<u8>) {
    match value {
        Json::Literal(text) => out.extend_from_slice(text.as_bytes()),
        Json::Str(text) => go_string(text, out),
        Json::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                walk(item, out);
            }
            out.push(b']');
        }
        Json::Object(members) => {
            out.push(b'{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                go_string(key, out);
                out.push(b':');
                walk(item, out);
            }
            out.push(b'}');
        }
    }
}

/// A string as Go's `encoding/json` writes it with `SetEscapeHTML(false)`.
fn go_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\u{2028}' => out.extend_from_slice(b"\\u2028"),
            '\u{2029}' => out.extend_from_slice(b"\\u2029"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Just enough JSON to keep numbers as written; nesting is bounded.
struct JsonParser<'a> {
    bytes: &'a [u8],
    at: usize,
}

const MAX_DEPTH: usize = 128;

impl JsonParser<'_> {
    fn space(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.at += 1;
        }
    }

    fn fail<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("JSON: {what} at byte {}", self.at))
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_DEPTH {
            return self.fail("nested too deeply");
        }
        self.space();
        match self.bytes.get(self.at) {
            Some(b'{') => {
                self.at += 1;
                let mut members = BTreeMap::new();
                self.space();
                if self.bytes.get(self.at) == Some(&b'}') {
                    self.at += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.space();
                    if self.bytes.get(self.at) != Some(&b'"') {
                        return self.fail("expected a key");
                    }
                    let key = self.string()?;
                    self.space();
                    if self.bytes.get(self.at) != Some(&b':') {
                        return self.fail("expected ':'");
                    }
                    self.at += 1;
                    // Go keeps the last of repeated keys.
                    members.insert(key, self.value(depth + 1)?);
                    self.space();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(Json::Object(members));
                        }
                        _ => return self.fail("expected ',' or '}'"),
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.space();
                if self.bytes.get(self.at) == Some(&b']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.space();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return self.fail("expected ',' or ']'"),
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(_) => {
                for word in ["true", "false", "null"] {
                    if self.bytes[self.at..].starts_with(word.as_bytes()) {
                        self.at += word.len();
                        return Ok(Json::Literal(word.into()));
                    }
                }
                self.number()
            }
            None => self.fail("unexpected end"),
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.at;
        let digits = |p: &mut Self| {
            let from = p.at;
            while p.bytes.get(p.at).is_some_and(u8::is_ascii_digit) {
                p.at += 1;
            }
            p.at > from
        };
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        if self.bytes.get(self.at) == Some(&b'0') {
            self.at += 1;
        } else if !digits(self) {
            return self.fail("expected a value");
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if !digits(self) {
                return self.fail("expected digits");
            }
        }
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.bytes.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if !digits(self) {
                return self.fail("expected digits");
            }
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).unwrap_or("0");
        Ok(Json::Literal(text.to_string()))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let Some(digits) = self.bytes.get(self.at..self.at + 4) else {
            return self.fail("a short \\u escape");
        };
        let text = std::str::from_utf8(digits).unwrap_or("");
        let value = u32::from_str_radix(text, 16).or_else(|_| self.fail("a bad \\u escape"))?;
        self.at += 4;
        Ok(value)
    }

    fn string(&mut self) -> Result<String, String> {
        self.at += 1;
        let mut out = String::new();
        loop {
            let Some(&byte) = self.bytes.get(self.at) else {
                return self.fail("an unterminated string");
            };
            match byte {
                b'"' => {
                    self.at += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.at += 1;
                    let Some(&escape) = self.bytes.get(self.at) else {
                        return self.fail("an unterminated escape");
                    };
                    self.at += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let first = self.hex4()?;
                            let c = if (0xD800..0xDC00).contains(&first)
                                && self.bytes[self.at..].starts_with(b"\\u")
                            {
                                let rewind = self.at;
                                self.at += 2;
                                let second = self.hex4()?;
                                if (0xDC00..0xE000).contains(&second) {
                                    char::from_u32(
                                        0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00),
                                    )
                                } else {
                                    self.at = rewind;
                                    None
                                }
                            } else {
                                char::from_u32(first)
                            };
                            // A lone surrogate becomes U+FFFD, as in Go.
                            out.push(c.unwrap_or('\u{FFFD}'));
                        }
                        _ => return self.fail("an unknown escape"),
                    }
                }
                byte if byte < 0x20 => return self.fail("a control character in a string"),
                _ => {
                    // The input is a &str: copy the whole UTF-8 sequence.
                    let len = match byte {
                        0xF0.. => 4,
                        0xE0.. => 3,
                        0xC0.. => 2,
                        _ => 1,
                    };
                    let piece = self
                        .bytes
                        .get(self.at..self.at + len)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .ok_or_else(|| format!("JSON: bad UTF-8 at byte {}", self.at))?;
                    out.push_str(piece);
                    self.at += len;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_files_are_digested_in_opas_canonical_form() {
        let text = "{\"b\": [1.0, 2e3, -0, true, null], \"a\": {\"y\": \"<&>\\u2028\\n\\u0001\", \"x\": \"\\ud83d\\ude00\"}}";
        let canonical = String::from_utf8(canonical_json(text).expect("json")).expect("utf8");
        assert_eq!(
            canonical,
            "{\"a\":{\"x\":\"\u{1F600}\",\"y\":\"<&>\\u2028\\n\\u0001\"},\"b\":[1.0,2e3,-0,true,null]}"
        );
        for bad in ["{", "[1,]", "{\"a\" 1}", "01", "\"\\x\"", "1 2"] {
            assert!(canonical_json(bad).is_err(), "{bad}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(canonical_json(&deep).is_err(), "nesting is bounded");
    }

    /// An Ed25519 pair from ring: (signing key, verification key).
    fn keys() -> (SigningKey, VerificationKey) {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let signing = SigningKey {
            algorithm: jsonwebtoken::Algorithm::EdDSA,
            key: jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
            key_id: Some("fleet".into()),
            scope: String::new(),
        };
        let verifying = VerificationKey {
            algorithm: jsonwebtoken::Algorithm::EdDSA,
            key: jsonwebtoken::DecodingKey::from_ed_der(pair.public_key().as_ref()),
            key_id: Some("fleet".into()),
            scope: String::new(),
        };
        (signing, verifying)
    }

    fn policy_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pexi-opa-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pexi")).expect("dir");
        std::fs::create_dir_all(dir.join("data")).expect("dir");
        std::fs::write(dir.join("pexi/http.rego"), "package pexi.http\n").expect("rego");
        std::fs::write(
            dir.join("data/hosts.json"),
            r#"{"allow": [{"host": "api.example.com"}], "deny": [{"host": "bad.example.com"}]}"#,
        )
        .expect("data");
        dir
    }

    #[test]
    fn a_built_and_signed_bundle_verifies_and_every_change_to_it_is_refused() {
        let dir = policy_dir();
        let (signing, verifying) = keys();
        let limits = Limits::default();
        let unsigned = OpaBundle::build(&dir, Some("r1")).expect("build").0;
        let parsed = OpaBundle::parse(&unsigned, limits).expect("parse");
        assert_eq!(parsed.verify(&verifying), Err(BundleError::Unsigned));
        let signed = OpaBundle::sign(&unsigned, &signing, limits).expect("sign");
        let bundle = OpaBundle::parse(&signed, limits).expect("parse");
        bundle.verify(&verifying).expect("verifies");
        assert_eq!(bundle.manifest_revision, "r1");
        let (allow, deny) = bundle.lists().expect("lists");
        assert_eq!((allow.len(), deny.len()), (1, 1));
        assert_eq!(bundle.rego_files().expect("rego").len(), 1);

        // A changed module, a changed entry (even re-serialised), an extra file, a missing one.
        let mut changed = bundle.clone();
        changed.files.insert(
            "pexi/http.rego".into(),
            b"package pexi.http\nallow := true\n".to_vec(),
        );
        assert_eq!(
            changed.verify(&verifying),
            Err(BundleError::Digest("pexi/http.rego".into()))
        );
        let mut data = bundle.clone();
        data.files.insert(
            "pexi/data.json".into(),
            br#"{"allow": [{"host": "**.com"}], "deny": []}"#.to_vec(),
        );
        assert_eq!(
            data.verify(&verifying),
            Err(BundleError::Digest("pexi/data.json".into()))
        );
        let mut extra = bundle.clone();
        extra
            .files
            .insert("pexi/more.rego".into(), b"package x\n".to_vec());
        assert_eq!(
            extra.verify(&verifying),
            Err(BundleError::NotCovered("pexi/more.rego".into()))
        );
        let mut missing = bundle.clone();
        missing.files.remove("pexi/data.json");
        assert_eq!(
            missing.verify(&verifying),
            Err(BundleError::Missing("pexi/data.json".into()))
        );
        // The same JSON in another spelling is the same document: it still verifies.
        let mut respelled = bundle.clone();
        respelled.files.insert(
            "pexi/data.json".into(),
            br#"{"deny":[{"host":"bad.example.com"}],"allow":[{"host":"api.example.com"}]}"#
                .to_vec(),
        );
        respelled
            .verify(&verifying)
            .expect("whitespace and key order do not matter");

        // Another key, another key id, another scope, another algorithm.
        let (_, stranger) = keys();
        assert!(matches!(
            bundle.verify(&stranger),
            Err(BundleError::Signature(_))
        ));
        let mut other_id = verifying.clone();
        other_id.key_id = Some("other".into());
        assert!(matches!(
            bundle.verify(&other_id),
            Err(BundleError::Signature(_))
        ));
        let mut scoped = verifying.clone();
        scoped.scope = "write".into();
        assert!(matches!(
            bundle.verify(&scoped),
            Err(BundleError::Signature(_))
        ));
        let mut rsa = verifying.clone();
        rsa.algorithm = jsonwebtoken::Algorithm::RS256;
        assert!(matches!(
            bundle.verify(&rsa),
            Err(BundleError::Signature(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bundles_over_their_limits_or_with_links_are_refused() {
        let dir = policy_dir();
        let archive = OpaBundle::build(&dir, Some("r")).expect("build").0;
        let small = Limits {
            max_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            OpaBundle::parse(&archive, small),
            Err(BundleError::Archive(_))
        ));
        let unpacked = Limits {
            max_unpacked_bytes: 20,
            ..Limits::default()
        };
        assert!(matches!(
            OpaBundle::parse(&archive, unpacked),
            Err(BundleError::Archive(_))
        ));
        // A symbolic link.
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        tar.append_link(&mut header, "pexi/x.rego", "/etc/passwd")
            .expect("link");
        let linked = tar.into_inner().expect("tar").finish().expect("gz");
        assert!(matches!(
            OpaBundle::parse(&linked, Limits::default()),
            Err(BundleError::File(_, _))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn paths_that_leave_the_bundle_are_refused() {
        assert_eq!(
            bundle_path(Path::new("/pexi/a.rego")),
            Ok("pexi/a.rego".into())
        );
        assert_eq!(
            bundle_path(Path::new("./data.json")),
            Ok("data.json".into())
        );
        assert!(bundle_path(Path::new("../x.rego")).is_err());
        assert!(bundle_path(Path::new("a/../../x")).is_err());
    }
}
