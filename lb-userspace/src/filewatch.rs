//! Watching a configuration file for changes (the agent's and the proxy's).
//!
//! The file is watched through its directory: editors save by writing a temporary file and
//! renaming it over the old one, which a watch on the file itself would lose. In Kubernetes a
//! ConfigMap volume is different again: `proxy.toml` is a symlink to `..data/proxy.toml`,
//! and an update writes a new timestamped directory and renames a `..data` symlink over the
//! old one. The file itself sees no event then, so a change of `..data` counts too.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use notify::Watcher as _;

/// The symlink kubelet swaps to update a ConfigMap or Secret volume atomically.
const KUBELET_DATA_LINK: &str = "..data";

/// Calls `changed` (on notify's thread) for every event that may have changed `path`'s
/// contents. Watching stops when the returned watcher is dropped.
pub fn watch_file(
    path: &Path,
    changed: impl Fn() + Send + 'static,
) -> notify::Result<notify::RecommendedWatcher> {
    let name = path.file_name().map(OsStr::to_os_string);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !event.kind.is_access() && event.paths.iter().any(|p| concerns(p, name.as_deref())) {
            changed();
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Whether an event on `event_path` may change the file named `name` in the same directory.
fn concerns(event_path: &Path, name: Option<&OsStr>) -> bool {
    let Some(event_name) = event_path.file_name() else {
        return false;
    };
    Some(event_name) == name || event_name == KUBELET_DATA_LINK
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_the_file_and_kubelets_data_link_concern_it() {
        let name = Some(OsStr::new("proxy.toml"));
        assert!(concerns(Path::new("/etc/xlb/proxy.toml"), name));
        assert!(concerns(Path::new("/etc/xlb/..data"), name));
        assert!(!concerns(Path::new("/etc/xlb/other.toml"), name));
        assert!(!concerns(Path::new("/etc/xlb/..data_tmp"), name));
        assert!(!concerns(Path::new("/"), name));
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-filewatch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// Waits (bounded) for one notification.
    fn notified(rx: &mpsc::Receiver<()>) -> bool {
        rx.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    #[test]
    fn a_rename_over_the_file_is_seen() {
        let dir = scratch_dir("rename");
        let file = dir.join("xlb.toml");
        std::fs::write(&file, "a").expect("write");
        let (tx, rx) = mpsc::channel();
        let _w = watch_file(&file, move || {
            let _ = tx.send(());
        })
        .expect("watch");
        std::fs::write(dir.join("xlb.toml.tmp"), "b").expect("write tmp");
        std::fs::rename(dir.join("xlb.toml.tmp"), &file).expect("rename");
        assert!(notified(&rx), "rename over the watched file");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// What kubelet does to a ConfigMap volume on update (its AtomicWriter).
    #[test]
    fn a_kubelet_configmap_update_is_seen() {
        let dir = scratch_dir("configmap");
        std::fs::create_dir(dir.join("..2026_11_22_00_00_00.1")).expect("mkdir");
        std::fs::write(dir.join("..2026_11_22_00_00_00.1/proxy.toml"), "a").expect("write");
        symlink("..2026_11_22_00_00_00.1", dir.join("..data")).expect("data link");
        symlink("..data/proxy.toml", dir.join("proxy.toml")).expect("file link");
        let (tx, rx) = mpsc::channel();
        let _w = watch_file(&dir.join("proxy.toml"), move || {
            let _ = tx.send(());
        })
        .expect("watch");
        std::fs::create_dir(dir.join("..2026_11_22_00_01_00.2")).expect("mkdir");
        std::fs::write(dir.join("..2026_11_22_00_01_00.2/proxy.toml"), "b").expect("write");
        symlink("..2026_11_22_00_01_00.2", dir.join("..data_tmp")).expect("tmp link");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        assert!(notified(&rx), "the ..data swap");
        assert_eq!(
            std::fs::read_to_string(dir.join("proxy.toml")).expect("read"),
            "b"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
