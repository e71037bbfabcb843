//! The at-rest key file on disk (format: `ferry_gm::atrest`). Reading refuses, with
//! the path in the message, a file that is missing, unreadable, not a regular file,
//! readable or writable by group or others, or malformed; creating writes a new
//! random key with mode 0600, never over an existing file. Rotating appends a new
//! current key and retiring removes an older one, each by writing the whole file
//! anew under a temporary name and renaming it over the old one (mode 0600,
//! fsynced with its directory): a crash leaves the old file or the new one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_gm::atrest::{Kek, KeyFileError, KeyId, RotateError};

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
    let mut text = read_checked(path)?;
    let kek = Kek::parse_key_file(&text).map_err(|source| KeyFileLoadError::Format {
        path: path.to_path_buf(),
        source,
    });
    wipe(&mut text);
    kek
}

/// The text held keys: overwrite it before the allocation is freed.
fn wipe(text: &mut String) {
    let mut bytes = std::mem::take(text).into_bytes();
    bytes.fill(b'0');
}

/// Key rotation: appends a new random key to the key file at `path` as its current
/// key (the older keys stay, so segments sealed under them stay readable). Returns
/// the new ring.
pub fn rotate_key_file(path: &Path) -> Result<Kek, KeyFileLoadError> {
    let mut text = read_checked(path)?;
    let rotated = Kek::rotated_key_file(&text);
    wipe(&mut text);
    let (ring, mut new) = rotated.map_err(|e| match e {
        RotateError::Format(source) => KeyFileLoadError::Format {
            path: path.to_path_buf(),
            source,
        },
        RotateError::Rng(e) => KeyFileLoadError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(e),
        },
    })?;
    let written = replace_file(path, &new);
    wipe(&mut new);
    written.map(|()| ring)
}

/// Retiring a key: removes older key `id` from the key file at `path` (never the
/// current key). The caller has checked that no stored segment needs it.
pub fn retire_key(path: &Path, id: KeyId) -> Result<Kek, KeyFileLoadError> {
    let format = |source| KeyFileLoadError::Format {
        path: path.to_path_buf(),
        source,
    };
    let mut text = read_checked(path)?;
    let without = Kek::key_file_without(&text, id);
    wipe(&mut text);
    let mut new = without.map_err(format)?;
    let ring = Kek::parse_key_file(&new).map_err(format);
    let written = ring.and_then(|r| replace_file(path, &new).map(|()| r));
    wipe(&mut new);
    written
}

/// Writes `text` as the new content of `path`: a temporary file (mode 0600,
/// fsynced), renamed over it, the directory fsynced.
fn replace_file(path: &Path, text: &str) -> Result<(), KeyFileLoadError> {
    let io = |source| KeyFileLoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let res = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    File::open(parent_dir(path))
        .and_then(|d| d.sync_all())
        .map_err(io)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The text of the key file at `path`, after the checks [`read_key_file`] names.
fn read_checked(path: &Path) -> Result<String, KeyFileLoadError> {
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
    if let Err(e) = (&mut f).take(MAX_KEY_FILE).read_to_string(&mut text) {
        wipe(&mut text);
        return Err(io(e));
    }
    Ok(text)
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
    File::open(parent_dir(path))
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(kek.id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rotate_then_retire_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.key");
        let first = create_key_file(&p).unwrap();
        let ring = rotate_key_file(&p).unwrap();
        assert_ne!(ring.id(), first);
        assert_eq!(ring.older_ids(), vec![first]);
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let back = read_key_file(&p).unwrap();
        assert_eq!((back.id(), back.older_ids()), (ring.id(), vec![first]));
        assert!(matches!(
            retire_key(&p, ring.id()),
            Err(KeyFileLoadError::Format {
                source: KeyFileError::RetireCurrent(_),
                ..
            })
        ));
        let after = retire_key(&p, first).unwrap();
        assert_eq!((after.id(), after.older_ids()), (ring.id(), vec![]));
        assert_eq!(read_key_file(&p).unwrap().id(), ring.id());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }

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
