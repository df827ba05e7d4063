//! `pexi policy bundle build|sign|verify`: OPA-format bundles from a policy folder, for a bundle server
//! (docs/fleet.md). A bundle built here runs in OPA as it is; one built by `opa build` and signed by
//! `opa sign` verifies here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use crate::policy::opa_bundle::{self, Limits, OpaBundle, SigningKey, VerificationKey};

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Build a bundle (.tar.gz) from a policy folder in pexi's layout: every *.rego, and the entries of
    /// data/*.json merged into pexi/data.json; with --signing-key, signed too.
    Build {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Where the bundle goes.
        #[arg(long, short, default_value = "bundle.tar.gz")]
        output: PathBuf,
        /// The manifest's revision (default: the digest of the files).
        #[arg(long)]
        revision: Option<String>,
        #[command(flatten)]
        signing: Signing,
    },
    /// Sign a bundle: write its .signatures.json (one JWT listing every file's SHA-256), as `opa sign`.
    Sign {
        bundle: PathBuf,
        /// Where the signed bundle goes (default: over BUNDLE).
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        signing: Signing,
    },
    /// Check a bundle's signature with a public key, as the PEP does before it serves one. Exit status 0
    /// when it verifies, 1 when it does not, 2 on error.
    Verify {
        bundle: PathBuf,
        /// The PEM public key.
        #[arg(long)]
        public_key: PathBuf,
        #[command(flatten)]
        token: Token,
    },
}

/// What the signature's token says besides the signature, as `[pep.policy.bundle]` checks it.
#[derive(clap::Args)]
pub struct Token {
    /// RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA.
    #[arg(long, default_value = "RS256")]
    algorithm: String,
    /// The key's id (`kid`; a PEP with key_id set requires it).
    #[arg(long)]
    key_id: Option<String>,
    /// The token's `scope` (a PEP with scope set requires it).
    #[arg(long, default_value = "")]
    scope: String,
}

#[derive(clap::Args)]
pub struct Signing {
    /// The PEM private key (PKCS#8, or PKCS#1 RSA / SEC1 EC).
    #[arg(long)]
    signing_key: Option<PathBuf>,
    #[command(flatten)]
    token: Token,
}

impl Signing {
    fn key(&self) -> Result<Option<SigningKey>, String> {
        let Some(path) = &self.signing_key else {
            return Ok(None);
        };
        let token = &self.token;
        let algorithm = opa_bundle::algorithm(&token.algorithm)?;
        let pem = std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))?;
        SigningKey::from_pem(&pem, algorithm, token.key_id.clone(), token.scope.clone())
            .map(Some)
            .map_err(|err| format!("{}: {err}", path.display()))
    }
}

pub fn run(command: BundleCommand) -> ExitCode {
    let done = match command {
        BundleCommand::Build {
            dir,
            output,
            revision,
            signing,
        } => build(&dir, &output, revision, &signing),
        BundleCommand::Sign {
            bundle,
            output,
            signing,
        } => sign(&bundle, output.as_deref().unwrap_or(&bundle), &signing),
        BundleCommand::Verify {
            bundle,
            public_key,
            token,
        } => return verify(&bundle, &public_key, token),
    };
    match done {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("pexi: {err}");
            ExitCode::from(2)
        }
    }
}

fn build(
    dir: &Path,
    output: &Path,
    revision: Option<String>,
    signing: &Signing,
) -> Result<String, String> {
    let key = signing.key()?;
    let (mut archive, revision) = OpaBundle::build(dir, revision.as_deref())?;
    if let Some(key) = &key {
        archive = OpaBundle::sign(&archive, key, Limits::default())?;
    }
    write(output, &archive)?;
    Ok(format!(
        "{}: revision {revision}, {}",
        output.display(),
        if key.is_some() {
            "signed"
        } else {
            "unsigned (sign it with pexi policy bundle sign)"
        }
    ))
}

fn sign(bundle: &Path, output: &Path, signing: &Signing) -> Result<String, String> {
    let key = signing
        .key()?
        .ok_or("--signing-key names the private key to sign with")?;
    let archive = std::fs::read(bundle).map_err(|err| format!("{}: {err}", bundle.display()))?;
    let signed = OpaBundle::sign(&archive, &key, Limits::default())
        .map_err(|err| format!("{}: {err}", bundle.display()))?;
    write(output, &signed)?;
    Ok(format!(
        "{}: signed ({})",
        output.display(),
        signing.token.algorithm
    ))
}

fn verify(bundle: &Path, public_key: &Path, token: Token) -> ExitCode {
    let key = opa_bundle::algorithm(&token.algorithm).and_then(|algorithm| {
        let pem =
            std::fs::read(public_key).map_err(|err| format!("{}: {err}", public_key.display()))?;
        VerificationKey::from_pem(&pem, algorithm, token.key_id, token.scope)
            .map_err(|err| format!("{}: {err}", public_key.display()))
    });
    let parsed = std::fs::read(bundle)
        .map_err(|err| format!("{}: {err}", bundle.display()))
        .and_then(|archive| {
            OpaBundle::parse(&archive, Limits::default())
                .map_err(|err| format!("{}: {err}", bundle.display()))
        });
    let (key, parsed) = match (key, parsed) {
        (Ok(key), Ok(parsed)) => (key, parsed),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    match parsed.verify(&key) {
        Ok(()) => {
            println!(
                "{}: verified (revision {:?}, {} files, {})",
                bundle.display(),
                parsed.manifest_revision,
                parsed.files.len(),
                parsed.digest
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("{}: REFUSED: {err}", bundle.display());
            ExitCode::from(1)
        }
    }
}

/// Written beside and renamed over, so a bundle server never serves half a bundle.
fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, bytes)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|err| format!("{}: {err}", path.display()))
}
