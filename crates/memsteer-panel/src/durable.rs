//! Durable atomic writes, the one implementation every memsteer crate uses: the content goes to a
//! temporary file in the destination's directory, which is flushed and `fsync`ed, renamed onto the
//! destination, and the directory is `fsync`ed so the rename itself survives a power loss. A reader sees
//! the old file or the whole new one, never a part; after a crash a file named in a manifest that was
//! written later is complete.
//!
//! ```
//! let dir = std::env::temp_dir().join(format!("durable-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("a.txt");
//! memsteer_panel::durable::write_bytes(&path, b"hello")?;
//! memsteer_panel::durable::write(&path, |w| w.write_all(b"world"))?;
//! assert_eq!(std::fs::read(&path)?, b"world");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary files of concurrent writes in one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary path beside `path`: `.NAME.tmp-PID-N`, hidden and unique to this process and call.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    path.with_file_name(name)
}

/// Writes `path` durably and atomically from `fill` (buffered); on an error before the rename the
/// temporary file is removed and `path` is left as it was. (An error from the directory's `fsync`
/// after the rename means `path` holds the new content but the rename may not survive a power loss.)
pub fn write(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        fill(&mut w)?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        commit_synced(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` durably and atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write(path, |w| w.write_all(bytes))
}

/// Moves a finished temporary file `tmp` (written by someone else, e.g. an image encoder; in the same
/// directory as `path`) onto `path` durably: `fsync` of the file, rename, `fsync` of the directory.
/// On error `tmp` is removed.
pub fn commit(tmp: &Path, path: &Path) -> std::io::Result<()> {
    let result = std::fs::File::open(tmp).and_then(|f| f.sync_all()).and_then(|()| commit_synced(tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn commit_synced(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    sync_dir(path)
}

/// `fsync`s the directory holding `path` (on Unix; elsewhere directories cannot be opened and renames are
/// made durable by the file system).
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_cleans_up_on_error() {
        let dir = std::env::temp_dir().join(format!("memsteer-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.txt");
        write_bytes(&path, b"first").unwrap();
        let e = write(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("interrupted"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "interrupted");
        assert_eq!(std::fs::read(&path).unwrap(), b"first", "a failed write leaves the old file");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("f.txt")], "no temporary file left behind");
        let tmp = temp_path(&path);
        std::fs::write(&tmp, b"second").unwrap();
        commit(&tmp, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(!tmp.exists());
        // A destination in a missing directory is an error, not a panic.
        assert!(write_bytes(&dir.join("missing/f.txt"), b"x").is_err());
        assert_ne!(temp_path(&path), temp_path(&path));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
