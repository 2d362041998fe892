//! The seed design's Node processes, started with their environment and logs, and the
//! MongoDB URI they are given.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The MongoDB URI `uri` with its database set to `db`, its options kept.
pub(crate) fn uri_with_db(uri: &str, db: &str) -> String {
    let (base, query) = match uri.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (uri, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A running `node SCRIPT`, its output in a log file; killed when dropped.
pub(crate) struct NodeProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl NodeProcess {
    pub(crate) fn spawn(
        dir: &Path,
        script: &str,
        env: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new("node")
            .arg(script)
            .current_dir(dir)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {script} in {}", dir.display()))?;
        Ok(Self { child, log })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub(crate) async fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}): {text}", self.log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} from {} within {timeout:?}: {text}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_uri_names_the_database_and_keeps_the_options() {
        assert_eq!(
            uri_with_db("mongodb://127.0.0.1:27017/?directConnection=true", "s1"),
            "mongodb://127.0.0.1:27017/s1?directConnection=true"
        );
        assert_eq!(uri_with_db("mongodb://h:1/old", "s2"), "mongodb://h:1/s2");
        assert_eq!(uri_with_db("mongodb://h:1", "s3"), "mongodb://h:1/s3");
    }
}
