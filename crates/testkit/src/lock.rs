//! A cross-process exclusive lock on a file (flock(2)), for one-time provisioning steps that
//! parallel test processes would otherwise race on (venv install, cargo build).

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::Context as _;
use rustix::fs::{flock, FlockOperation};

/// Held while alive; the kernel drops the lock when the file closes, also if the process dies.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock is ours. Call from a blocking context (`spawn_blocking`).
    pub(crate) fn acquire(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating lock directory {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        loop {
            match flock(&file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(Self { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(std::io::Error::from(e))
                        .with_context(|| format!("locking {}", path.display()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flock conflicts between separate open file descriptions, which is what separate test
    /// processes have (and separate threads of one process, since each acquire opens anew).
    #[test]
    fn a_held_lock_excludes_others_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = FileLock::acquire(&path).unwrap();
        let other = File::open(&path).unwrap();
        assert_eq!(
            flock(&other, FlockOperation::NonBlockingLockExclusive),
            Err(rustix::io::Errno::WOULDBLOCK)
        );
        drop(held);
        flock(&other, FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}
