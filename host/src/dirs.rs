//! Where the PEP keeps its state when the config does not say: a per-user, owner-only folder, never a
//! shared one such as `/tmp` (where another user could create the folder first, or plant a link, and read
//! or forge the audit log).
//!
//! `config.toml` names these places with two placeholders at the start of a path:
//! - `{state_dir}`: the audit log and its key. `$XDG_STATE_HOME/pexi` (else `~/.local/state/pexi`) on
//!   Linux, `~/Library/Application Support/pexi` on macOS.
//! - `{runtime_dir}`: sockets and the VM runner's files. `$XDG_RUNTIME_DIR/pexi` where the session has
//!   one, else `{state_dir}/run`.
//!
//! Both are created with mode 0700; one that exists but belongs to another user, or that others may
//! write, is refused.

use std::path::{Path, PathBuf};

const STATE: &str = "{state_dir}";
const RUNTIME: &str = "{runtime_dir}";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot tell this user's home folder, so {0} has no value: set HOME (or XDG_STATE_HOME), or give an absolute path in the config")]
    NoHome(&'static str),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path} belongs to user id {owner}, not to this user ({me}): refusing to keep pexi's state there")]
    NotOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is {kind}, not a folder: refusing to keep pexi's state there")]
    NotFolder { path: PathBuf, kind: &'static str },
    #[error("{path} may be written by other users (mode {mode:o}): refusing to keep pexi's state there; chmod 700 it")]
    Shared { path: PathBuf, mode: u32 },
}

/// The two default places, resolved from the environment once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserDirs {
    pub state: PathBuf,
    pub runtime: PathBuf,
}

impl UserDirs {
    /// From the process environment and the platform's conventions.
    pub fn from_env() -> Result<UserDirs, DirError> {
        let project =
            directories::ProjectDirs::from("", "", "pexi").ok_or(DirError::NoHome(STATE))?;
        // macOS has no state folder: Application Support is where an app keeps what it must not lose.
        let state = project
            .state_dir()
            .unwrap_or_else(|| project.data_local_dir())
            .to_path_buf();
        let runtime = project
            .runtime_dir()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| state.join("run"));
        Ok(UserDirs { state, runtime })
    }

    /// `path` with a leading placeholder replaced; other paths unchanged.
    pub fn expand(&self, path: &Path) -> PathBuf {
        let text = path.to_string_lossy();
        for (placeholder, dir) in [(STATE, &self.state), (RUNTIME, &self.runtime)] {
            if let Some(rest) = text.strip_prefix(placeholder) {
                return dir.join(rest.trim_start_matches('/'));
            }
        }
        path.to_path_buf()
    }

    /// The folder a placeholder path starts with, if it starts with one.
    pub fn root_of(&self, path: &Path) -> Option<PathBuf> {
        let text = path.to_string_lossy();
        if text.starts_with(STATE) {
            Some(self.state.clone())
        } else if text.starts_with(RUNTIME) {
            Some(self.runtime.clone())
        } else {
            None
        }
    }

    /// Whether `path` lies in one of the per-user folders (so its folder must be private).
    pub fn holds(&self, path: &Path) -> bool {
        path.starts_with(&self.state) || path.starts_with(&self.runtime)
    }
}

/// Whether a configured path names a per-user folder by placeholder.
pub fn is_placeholder(path: &Path) -> bool {
    let text = path.to_string_lossy();
    text.starts_with(STATE) || text.starts_with(RUNTIME)
}

/// [`ensure_private`] for each folder, in order (ancestors first).
pub fn ensure_private_all(dirs: &[PathBuf]) -> Result<(), DirError> {
    dirs.iter().try_for_each(|dir| ensure_private(dir))
}

/// Creates `dir` (and missing parents) owner-only, or checks that the existing one is this user's and
/// that nobody else may write it.
pub fn ensure_private(dir: &Path) -> Result<(), DirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io = |what: &'static str| {
        move |source| DirError::Io {
            path: dir.to_path_buf(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(dir) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("create"))?;
            // A recursive create honours the umask for each level; the last one is ours to fix.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("chmod 700"))?;
        }
        Err(err) => return Err(io("inspect")(err)),
        Ok(_) => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io("inspect"))?;
    let kind = meta.file_type();
    if !kind.is_dir() {
        return Err(DirError::NotFolder {
            path: dir.to_path_buf(),
            kind: if kind.is_symlink() {
                "a symbolic link"
            } else {
                "a file"
            },
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(DirError::NotOwner {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::Shared {
            path: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pexi-dirs-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn placeholders_expand_only_at_the_start() {
        let dirs = UserDirs {
            state: "/home/a/.local/state/pexi".into(),
            runtime: "/run/user/1000/pexi".into(),
        };
        assert_eq!(
            dirs.expand(Path::new("{state_dir}/audit.jsonl")),
            PathBuf::from("/home/a/.local/state/pexi/audit.jsonl")
        );
        assert_eq!(
            dirs.expand(Path::new("{runtime_dir}/pep.sock")),
            PathBuf::from("/run/user/1000/pexi/pep.sock")
        );
        assert_eq!(
            dirs.expand(Path::new("/var/log/{state_dir}")),
            PathBuf::from("/var/log/{state_dir}")
        );
        assert!(dirs.holds(Path::new("/run/user/1000/pexi/vm")));
        assert!(!dirs.holds(Path::new("/tmp/pexi")));
    }

    #[test]
    fn a_new_folder_is_owner_only_and_a_shared_one_is_refused() {
        let dir = scratch("new");
        let nested = dir.join("a/b");
        ensure_private(&nested).expect("created");
        let mode = std::fs::metadata(&nested)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        ensure_private(&nested).expect("an existing private folder is fine");

        std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = ensure_private(&nested).expect_err("world-writable");
        assert!(matches!(err, DirError::Shared { .. }), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");

        let link = dir.join("link");
        std::os::unix::fs::symlink(&nested, &link).expect("symlink");
        let err = ensure_private(&link).expect_err("a link");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_folder_of_another_user_is_refused() {
        // Root can make a folder that belongs to someone else; other users cannot, so this part needs root.
        if nix::unistd::geteuid().as_raw() != 0 {
            return;
        }
        let dir = scratch("other");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
        let err = ensure_private(&dir).expect_err("another user's");
        assert!(
            matches!(err, DirError::NotOwner { owner: 65534, .. }),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
