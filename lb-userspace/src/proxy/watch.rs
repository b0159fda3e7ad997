//! Watches the configuration file and applies valid changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::ProxyConfig;
use super::server::Reloader;

/// Editors save by writing a temporary file and renaming it, in several events: wait for the
/// burst to settle before reading.
const SETTLE: Duration = Duration::from_millis(150);

/// Keeps the watch alive; dropping it stops watching.
#[derive(Debug)]
pub struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Loads `path` and applies it, logging the outcome. Returns whether it was applied.
pub fn reload_from(path: &Path, reloader: &Reloader) -> bool {
    let result = ProxyConfig::load(path)
        .map_err(super::server::ProxyError::from)
        .and_then(|cfg| reloader.apply(cfg));
    match result {
        Ok(()) => {
            tracing::info!(path = %path.display(), "configuration applied");
            true
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "configuration rejected; keeping the previous one");
            false
        }
    }
}

/// Starts watching `path` (through its directory, so renames are seen) and applies it on
/// every change. Must be called within a tokio runtime.
pub fn watch(path: PathBuf, reloader: Reloader) -> notify::Result<ConfigWatch> {
    let file = path.clone();
    on_change(path, move || {
        reload_from(&file, &reloader);
    })
}

/// Calls `changed` after each burst of changes to `path` (see [`crate::filewatch`] for what
/// counts as one). Must be called within a tokio runtime.
pub fn on_change(
    path: PathBuf,
    changed: impl Fn() + Send + 'static,
) -> notify::Result<ConfigWatch> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = crate::filewatch::watch_file(&path, move || {
        let _ = tx.send(());
    })?;
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            changed();
        }
    });
    Ok(ConfigWatch {
        _watcher: watcher,
        task,
    })
}
