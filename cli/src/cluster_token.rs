//! Where a process finds its cluster's token (`tandem_proto::auth`).
//!
//! `--cluster-token-file` names a file that holds it (a Kubernetes Secret, say); it
//! must exist. Without the flag, the processes of one cluster on one machine share a
//! file in the user's state directory, `$XDG_STATE_HOME/tandem/<cluster>.token`
//! (`~/.local/state/tandem/…` when XDG_STATE_HOME is unset): the first process creates
//! it with a fresh token, readable by its owner alone, and the others read it. A file
//! there that others could read or replace is refused.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tandem_proto::auth::ClusterToken;

/// How the router and the workers of a cluster know each other.
#[derive(Args, Debug, Clone)]
pub struct TokenFlags {
    /// A file holding the cluster's token (32 to 512 visible ASCII characters), which every
    /// router and worker of the cluster shares: workers refuse calls and KV sessions without
    /// it. Default: a file per cluster in the user's state directory, created on first use.
    #[arg(long, env = "TANDEM_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
}

impl TokenFlags {
    /// The token, and where it came from (for the start-up line).
    pub fn load(&self, cluster: &str) -> Result<(ClusterToken, PathBuf)> {
        match &self.cluster_token_file {
            Some(path) => Ok((read(path, false)?, path.clone())),
            None => {
                let path = default_path(cluster)?;
                Ok((load_or_create(&path)?, path))
            }
        }
    }
}

/// The shared file of `cluster`'s token on this machine.
pub fn default_path(cluster: &str) -> Result<PathBuf> {
    let state = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| anyhow!("neither XDG_STATE_HOME nor HOME is set: give --cluster-token-file"))?;
            PathBuf::from(home).join(".local/state")
        }
    };
    Ok(state.join("tandem").join(format!("{cluster}.token")))
}

/// Reads the token at `path`, creating the file (and its directory, owner-only) with a
/// fresh token when there is none. Two processes starting at once agree on one token.
pub fn load_or_create(path: &Path) -> Result<ClusterToken> {
    if std::fs::symlink_metadata(path).is_ok() {
        return read(path, true);
    }
    let dir = path.parent().ok_or_else(|| anyhow!("{} has no directory", path.display()))?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let token = ClusterToken::random();
    // Written in full under a private name, then linked into place: a reader never sees
    // half a token, and of two creators the first link wins.
    let tmp =
        dir.join(format!(".{}.{}.tmp", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(token.expose().as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    };
    let written = write().with_context(|| format!("writing {}", tmp.display()));
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    });
    let _ = std::fs::remove_file(&tmp);
    if linked? {
        Ok(token)
    } else {
        read(path, true)
    }
}

/// Reads a token file. `private`: the file must be a regular file of this user that no
/// one else can read or write (the default location; a mounted Secret is neither).
fn read(path: &Path, private: bool) -> Result<ClusterToken> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("the cluster token file {} (write 32+ random characters into it)", path.display()))?;
    if private {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "the cluster token file {} must be a regular file of this user, readable by its owner alone \
                 (chmod 600), or name another with --cluster-token-file",
                path.display()
            );
        }
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ClusterToken::new(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_process_creates_the_token_and_the_others_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/tandem/c1.token");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.expose(), b.expose());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_token_file_others_can_read_or_a_symlink_is_refused_at_the_default_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c2.token");
        let t = load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        // Named explicitly (a mounted Secret is root's and 0644), it is read.
        let flags = TokenFlags { cluster_token_file: Some(path.clone()) };
        assert_eq!(flags.load("c2").unwrap().0.expose(), t.expose());
        let link = dir.path().join("c3.token");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(load_or_create(&link).is_err(), "a symlink at the default place");
    }

    #[test]
    fn a_named_file_must_exist_and_hold_a_real_token() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TokenFlags { cluster_token_file: Some(dir.path().join("none")) };
        assert!(missing.load("c").is_err(), "a named file is never created");
        let short = dir.path().join("short");
        std::fs::write(&short, "too-short").unwrap();
        let err = TokenFlags { cluster_token_file: Some(short) }.load("c").unwrap_err().to_string();
        assert!(err.contains("32 to 512"), "{err}");
    }
}
