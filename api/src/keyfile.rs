//! The at-rest key file on disk (format: `ferry_gm::atrest`). Reading refuses, with
//! the path in the message, a file that is missing, unreadable, not a regular file,
//! readable or writable by group or others, or malformed; creating writes a new
//! random key with mode 0600, never over an existing file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_gm::atrest::{Kek, KeyFileError, KeyId};

/// Longest key file read (a key line and comments); a larger file is refused.
const MAX_KEY_FILE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileLoadError {
    #[error("key file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("key file {} has mode {mode:04o}: group or others may access it; run chmod 600 on it", path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("key file {} is larger than {MAX_KEY_FILE} bytes: not a ferry key file", path.display())]
    TooLarge { path: PathBuf },
    #[error("key file {}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: KeyFileError,
    },
}

/// Reads and checks the key file at `path`.
pub fn read_key_file(path: &Path) -> Result<Kek, KeyFileLoadError> {
    let io = |source| KeyFileLoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let md = f.metadata().map_err(io)?;
    if !md.is_file() {
        return Err(KeyFileLoadError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileLoadError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if md.len() > MAX_KEY_FILE {
        return Err(KeyFileLoadError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let mut text = String::new();
    (&mut f)
        .take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(io)?;
    let kek = Kek::parse_key_file(&text).map_err(|source| KeyFileLoadError::Format {
        path: path.to_path_buf(),
        source,
    });
    // The text held the key: overwrite it before the allocation is freed.
    let mut bytes = std::mem::take(&mut text).into_bytes();
    bytes.fill(b'0');
    drop(bytes);
    kek
}

/// Creates a new key file at `path` (mode 0600, refused if it exists), fsynced with
/// its directory, and returns the new key's id.
pub fn create_key_file(path: &Path) -> Result<KeyId, KeyFileLoadError> {
    let io = |source| KeyFileLoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (kek, text) = Kek::generate_key_file().map_err(|e| io(io::Error::other(e)))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let mut bytes = text.into_bytes();
    let written = f.write_all(&bytes).and_then(|()| f.sync_all());
    bytes.fill(b'0');
    written.map_err(io)?;
    // The directory entry too: losing the key file after data was encrypted under
    // it would lose that data.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(kek.id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_files_read_back_and_loose_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.key");
        let id = create_key_file(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_key_file(&p).unwrap().id(), id);
        // Never over an existing key.
        assert!(matches!(
            create_key_file(&p),
            Err(KeyFileLoadError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_key_file(&p).unwrap_err();
        assert!(
            matches!(e, KeyFileLoadError::Permissions { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let e = read_key_file(&dir.path().join("missing.key")).unwrap_err();
        assert!(e.to_string().contains("missing.key"), "{e}");
        assert!(
            matches!(&e, KeyFileLoadError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(matches!(
            read_key_file(dir.path()),
            Err(KeyFileLoadError::NotAFile { .. })
        ));
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not a key\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_key_file(&bad),
            Err(KeyFileLoadError::Format { .. })
        ));
    }
}
