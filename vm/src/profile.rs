//! Profiles: ready-made guest setups as data. A profile raises memory and vCPUs, names a default command,
//! mounts folders from a host directory it requires, takes an optional config file for the guest, and may
//! have init start pexi-guestd first. The built-in ones are files under `vm/profiles/` compiled in
//! (`openclaw`); `--profile PATH.toml` reads any file with the same keys.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::GuestArch;

/// The profiles compiled in, by name.
const BUILT_IN: &[(&str, &str)] = &[("openclaw", include_str!("../profiles/openclaw.toml"))];

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The built-in name or the file's stem; `[vm.profiles.NAME]` overrides apply to it.
    #[serde(skip)]
    pub name: String,
    pub description: String,
    /// Start pexi-guestd from init before the command.
    #[serde(default)]
    pub guestd: bool,
    /// At least this much memory.
    pub memory_mb: Option<u32>,
    /// At least this many vCPUs.
    pub cpus: Option<u32>,
    /// The command when none is given.
    pub command: Option<String>,
    pub dir: Option<ProfileDir>,
    #[serde(default)]
    pub mounts: Vec<ProfileMount>,
    pub config_file: Option<ConfigFile>,
}

/// The host folder a profile's mounts come from, per guest architecture.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileDir {
    pub x86_64: PathBuf,
    pub aarch64: PathBuf,
    /// A path under the folder that must exist, or the run stops with `install_<arch>`'s advice.
    pub requires: Option<PathBuf>,
    #[serde(default)]
    pub install_x86_64: String,
    #[serde(default)]
    pub install_aarch64: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileMount {
    /// Relative to the profile's folder.
    pub from: PathBuf,
    pub guest: String,
    #[serde(default)]
    pub writable: bool,
}

/// Where `--profile-config FILE` goes in the guest (read-only) and the variable that names it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub guest: String,
    pub env: String,
}

impl Profile {
    /// A built-in profile by name, or a profile file by path.
    pub fn load(spec: &str) -> Result<Profile, String> {
        if let Some((name, text)) = BUILT_IN.iter().find(|(name, _)| *name == spec) {
            return Profile::parse(name, name, text);
        }
        let path = Path::new(spec);
        if path.extension().is_some_and(|e| e == "toml") || path.components().count() > 1 {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("profile file {}: {err}", path.display()))?;
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            return Profile::parse(name, &path.display().to_string(), &text);
        }
        let known: Vec<String> = BUILT_IN
            .iter()
            .filter_map(|(name, text)| Profile::parse(name, name, text).ok())
            .map(|profile| format!("{}: {}", profile.name, profile.description))
            .collect();
        Err(format!(
            "{spec:?} is not a profile (built in: {}; or give a profile file, NAME.toml)",
            known.join("; ")
        ))
    }

    fn parse(name: &str, source: &str, text: &str) -> Result<Profile, String> {
        // The name becomes a folder of the run (for the config file): letters, digits, `-` and `_` only.
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "profile {source}: its name {name:?} (the file's stem) may hold only letters, digits, - and _"
            ));
        }
        let mut profile: Profile =
            toml::from_str(text).map_err(|err| format!("profile {source}: {err}"))?;
        profile.name = name.to_string();
        if let Some(file) = &profile.config_file {
            if !file.guest.starts_with('/') || Path::new(&file.guest).file_name().is_none() {
                return Err(format!(
                    "profile {source}: config_file.guest {:?} must be an absolute file path",
                    file.guest
                ));
            }
        }
        for mount in &profile.mounts {
            if !mount.guest.starts_with('/') || mount.from.is_absolute() {
                return Err(format!(
                    "profile {source}: a mount's guest path must be absolute and its `from` relative to `dir`"
                ));
            }
        }
        if !profile.mounts.is_empty() && profile.dir.is_none() {
            return Err(format!("profile {source}: mounts need a [dir]"));
        }
        Ok(profile)
    }
}

impl std::str::FromStr for Profile {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        Profile::load(spec)
    }
}

impl ProfileDir {
    pub fn for_arch(&self, arch: GuestArch) -> &Path {
        match arch {
            GuestArch::X86_64 => &self.x86_64,
            GuestArch::Aarch64 => &self.aarch64,
        }
    }

    pub fn install(&self, arch: GuestArch, dir: &Path) -> String {
        let advice = match arch {
            GuestArch::X86_64 => &self.install_x86_64,
            GuestArch::Aarch64 => &self.install_aarch64,
        };
        advice.replace("{dir}", &dir.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_parses() {
        for (name, _) in BUILT_IN {
            let profile = Profile::load(name).expect("built-in profile");
            assert_eq!(&profile.name, name);
            assert!(!profile.description.is_empty());
        }
        let openclaw = Profile::load("openclaw").expect("openclaw");
        assert!(openclaw.guestd);
        assert_eq!(openclaw.memory_mb, Some(2048));
    }

    #[test]
    fn a_profile_file_is_read_and_a_bad_one_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("pexi-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let good = dir.join("mine.toml");
        std::fs::write(
            &good,
            "description = \"d\"\ncommand = \"echo hi\"\ncpus = 3\n",
        )
        .expect("write");
        let profile = Profile::load(good.to_str().expect("utf-8")).expect("loads");
        assert_eq!((profile.name.as_str(), profile.cpus), ("mine", Some(3)));
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "description = \"d\"\nmemroy_mb = 1\n").expect("write");
        let err = Profile::load(bad.to_str().expect("utf-8")).expect_err("typo");
        assert!(err.contains("memroy_mb"), "{err}");
        let orphan = dir.join("orphan.toml");
        std::fs::write(
            &orphan,
            "description = \"d\"\n[[mounts]]\nfrom = \"x\"\nguest = \"/x\"\n",
        )
        .expect("write");
        assert!(Profile::load(orphan.to_str().expect("utf-8")).is_err());
        // A stem that would name a folder outside the run's (`...toml` has the stem `..`).
        let dots = dir.join("...toml");
        std::fs::write(&dots, "description = \"d\"\n").expect("write");
        let err = Profile::load(dots.to_str().expect("utf-8")).expect_err("dots");
        assert!(err.contains("letters, digits"), "{err}");
        assert!(Profile::load("nosuch")
            .expect_err("unknown")
            .contains("openclaw"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
