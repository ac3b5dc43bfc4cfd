//! File watching for reload. Directories are watched, not files, so that every way a file
//! is replaced is seen: in-place writes, editors' write-to-temp-then-rename, delete and
//! recreate, and symlink swaps (Kubernetes' `..data`, configuration managers' `ln -sfn`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::ModifyKind;
use notify::{EventKind, RecursiveMode};

/// Whether a file event can mean new content. Opening and reading a file is not a change, nor
/// is a metadata event (inotify's IN_ATTRIB also fires for access-time updates): counting them
/// would make every read of a watched file (each reload's, each token read) trigger the next.
pub fn is_content_change(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
    )
}
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Debounce window: editors and `cp` produce bursts; one reload per burst.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Directories to watch and the file names in them that matter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchSet {
    pub dirs: BTreeSet<PathBuf>,
    pub names: BTreeSet<OsString>,
}

impl WatchSet {
    /// For each file: its directory and name, and, when it is a symlink, its target's too
    /// (so an in-place edit of the target is seen).
    pub fn for_files(files: &[&Path]) -> WatchSet {
        let mut set = WatchSet::default();
        for file in files {
            set.add(file);
            if let Ok(target) = std::fs::canonicalize(file)
                && target != *file
            {
                set.add(&target);
            }
        }
        set
    }

    fn add(&mut self, file: &Path) {
        if let (Some(dir), Some(name)) = (file.parent(), file.file_name()) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            self.dirs.insert(dir.to_path_buf());
            self.names.insert(name.to_os_string());
        }
    }

    /// Whether an event on `path` can concern one of the files.
    pub fn matters(&self, path: &Path) -> bool {
        path.file_name()
            .is_some_and(|n| self.names.contains(n) || n.to_string_lossy().starts_with(".."))
    }
}

/// A running watcher; dropping it stops watching.
pub struct FileWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    pub set: WatchSet,
}

/// Starts watching; each debounced burst that touches a watched file sends one `()`.
pub fn watch(set: WatchSet, tx: mpsc::UnboundedSender<()>) -> notify::Result<FileWatcher> {
    let filter = set.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| match res {
        Ok(events) => {
            // Opening and reading a file (every reload reads them all) is not a change, nor
            // is a metadata event (inotify's IN_ATTRIB also fires for access-time updates):
            // counting them could make every reload trigger the next. A permissions-only fix
            // is applied with `systemctl reload`.
            let changes = events.iter().filter(|e| is_content_change(&e.kind));
            if changes
                .into_iter()
                .any(|e| e.paths.iter().any(|p| filter.matters(p)))
            {
                let _ = tx.send(());
            }
        }
        Err(errors) => {
            for e in errors {
                warn!(error = %e, "file watcher error");
            }
        }
    })?;
    for dir in &set.dirs {
        match debouncer.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => debug!(dir = %dir.display(), "watching"),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory; SIGHUP still reloads")
            }
        }
    }
    Ok(FileWatcher {
        _debouncer: debouncer,
        set,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_watched_names_and_symlink_swaps_matter() {
        let set = WatchSet::for_files(&[
            Path::new("/etc/x/mcp-tunnel.toml"),
            Path::new("/var/lib/x/tls.crt"),
        ]);
        assert!(
            set.dirs.contains(Path::new("/etc/x")) && set.dirs.contains(Path::new("/var/lib/x"))
        );
        assert!(set.matters(Path::new("/etc/x/mcp-tunnel.toml")));
        assert!(set.matters(Path::new("/var/lib/x/tls.crt")));
        assert!(set.matters(Path::new("/etc/x/..data")));
        assert!(!set.matters(Path::new("/etc/x/other.toml")));
        assert!(!set.matters(Path::new("/etc/x/.mcp-tunnel.toml.swp")));
    }
}
