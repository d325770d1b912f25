//! What the daemon learns from the desired directory besides its contents: when it changed (a
//! file watch, debounced, so a `git checkout` or `git pull` that writes many files makes one
//! pass), and which generation it is (the git HEAD commit when the directory is in a git
//! checkout, otherwise the content hash of its files).

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A running watch on the desired directory (and the git directory that holds its HEAD).
pub struct Watch {
    events: mpsc::UnboundedReceiver<()>,
    _watcher: notify::RecommendedWatcher,
    /// A change was seen and its quiet period not yet waited out: kept across calls, so a
    /// [`Watch::changed`] dropped halfway (the daemon's select woke for a timer) loses nothing.
    seen: bool,
}

impl Watch {
    pub fn start(dir: &Path) -> notify::Result<Watch> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(event) = res {
                    if !matches!(event.kind, EventKind::Access(_)) {
                        let _ = tx.send(());
                    }
                }
            })?;
        watcher.watch(dir, RecursiveMode::Recursive)?;
        if let Some(git) = git_dir(dir) {
            if !git.starts_with(dir) {
                watcher.watch(&git, RecursiveMode::Recursive)?;
            }
        }
        Ok(Watch {
            events,
            _watcher: watcher,
            seen: false,
        })
    }

    /// Waits for a change, then until nothing more changed for `quiet`. Cancel-safe: dropped
    /// before it returns, the change it saw is reported by the next call.
    pub async fn changed(&mut self, quiet: Duration) {
        if !self.seen {
            if self.events.recv().await.is_none() {
                // The watcher is gone: never report a change again.
                std::future::pending::<()>().await;
            }
            self.seen = true;
        }
        while let Ok(Some(())) = tokio::time::timeout(quiet, self.events.recv()).await {}
        self.seen = false;
    }
}

/// The generation of a desired state: the HEAD commit of the git checkout that holds `dir`,
/// else `content_hash`.
pub fn generation(dir: &Path, content_hash: &str) -> String {
    git_head(dir).unwrap_or_else(|| content_hash.to_string())
}

/// The `.git` directory of the checkout that holds `dir` (a `.git` file, as in worktrees, points
/// at it).
fn git_dir(dir: &Path) -> Option<PathBuf> {
    let dir = dir.canonicalize().ok()?;
    for d in dir.ancestors() {
        let dot = d.join(".git");
        if dot.is_dir() {
            return Some(dot);
        }
        if let Ok(text) = std::fs::read_to_string(&dot) {
            let path = text.strip_prefix("gitdir:")?.trim();
            return Some(d.join(path));
        }
    }
    None
}

/// HEAD's commit id, read from the git directory's files (no git binary needed).
fn git_head(dir: &Path) -> Option<String> {
    let git = git_dir(dir)?;
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:").map(str::trim) else {
        return Some(head.to_string());
    };
    // A worktree keeps its refs in the common directory.
    let common = std::fs::read_to_string(git.join("commondir"))
        .map(|c| git.join(c.trim()))
        .unwrap_or_else(|_| git.clone());
    for base in [&git, &common] {
        if let Ok(id) = std::fs::read_to_string(base.join(reference)) {
            return Some(id.trim().to_string());
        }
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed.lines().find_map(|l| {
        let (id, name) = l.split_once(' ')?;
        (name == reference).then(|| id.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn the_generation_is_head_in_a_checkout_and_the_hash_elsewhere() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path();
        let desired = repo.join("desired");
        std::fs::create_dir_all(&desired).unwrap();
        assert_eq!(generation(&desired, "hash"), "hash");
        std::fs::write(desired.join("stack.toml"), "").unwrap();
        git(repo, &["init", "-q", "-b", "main"]);
        git(repo, &["add", "."]);
        git(repo, &["commit", "-qm", "one"]);
        let head = git(repo, &["rev-parse", "HEAD"]);
        assert_eq!(generation(&desired, "hash"), head);
        // Packed refs (after gc) and a detached HEAD read the same.
        git(repo, &["pack-refs", "--all"]);
        assert_eq!(generation(&desired, "hash"), head);
        git(repo, &["checkout", "-q", "--detach"]);
        assert_eq!(generation(&desired, "hash"), head);
    }

    #[tokio::test]
    async fn a_change_seen_by_a_wait_that_was_dropped_is_reported_by_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let mut watch = Watch::start(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("stack.toml"), "x").unwrap();
        // The daemon's select wakes for a timer while the change's quiet period runs.
        let dropped = tokio::time::timeout(
            Duration::from_millis(300),
            watch.changed(Duration::from_secs(3600)),
        )
        .await;
        assert!(dropped.is_err(), "still waiting for quiet when dropped");
        tokio::time::timeout(
            Duration::from_secs(10),
            watch.changed(Duration::from_millis(100)),
        )
        .await
        .expect("the change is not lost");
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_one_change() {
        let tmp = tempfile::tempdir().unwrap();
        let mut watch = Watch::start(tmp.path()).unwrap();
        for i in 0..20 {
            std::fs::write(tmp.path().join(format!("f{i}.toml")), "x").unwrap();
        }
        tokio::time::timeout(
            Duration::from_secs(10),
            watch.changed(Duration::from_millis(200)),
        )
        .await
        .expect("the writes are seen");
        // Nothing more happened: no second change is pending.
        let again = tokio::time::timeout(
            Duration::from_millis(500),
            watch.changed(Duration::from_millis(100)),
        )
        .await;
        assert!(again.is_err(), "one burst, one change");
    }
}
