//! Small loop-mounted ext4 filesystems under a node's journal, undo log and replica,
//! and the disk-full fault on them: a filler file takes every free block, the
//! workload runs into ENOSPC, then the filler goes and the cluster must recover.
//! Needs root, losetup, mkfs.ext4 and mount; [`probe`] says why not where they are
//! missing, and the run reports that fault kind as skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Can loop filesystems be made here? `Err(why not)` otherwise.
pub fn probe(scratch: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (losetup, mount)".into());
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount"] {
        if !ferry_testkit::have(tool) {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    LoopFs::new(scratch, "probe", 4 << 20)
        .map(drop)
        .map_err(|e| format!("cannot make a loop filesystem: {e:#}"))
}

/// A file-backed ext4 filesystem mounted at `mnt`, torn down when dropped.
pub struct LoopFs {
    pub mnt: PathBuf,
    image: PathBuf,
    dev: Option<String>,
    mounted: bool,
    filler: PathBuf,
}

impl LoopFs {
    /// `size` bytes of ext4 (no reserved blocks) at `dir/NAME.mnt`.
    pub fn new(dir: &Path, name: &str, size: u64) -> Result<LoopFs> {
        let image = dir.join(format!("{name}.ext4"));
        let mnt = dir.join(format!("{name}.mnt"));
        std::fs::File::create(&image)?.set_len(size)?;
        std::fs::create_dir_all(&mnt)?;
        let mut fs = LoopFs {
            filler: mnt.join("torture-filler"),
            mnt,
            image,
            dev: None,
            mounted: false,
        };
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&fs.image))?;
        let dev = run(Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&fs.image))?;
        fs.dev = Some(dev.clone());
        crate::cleanup::add_mount(fs.mnt.clone(), dev.clone());
        run(Command::new("mount").arg(&dev).arg(&fs.mnt))?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Takes every free block: writes the filler until ENOSPC (1 MiB, then 4 KiB
    /// steps). Returns the bytes taken.
    pub fn fill(&self) -> Result<u64> {
        let mut f = std::fs::File::create(&self.filler)?;
        let mut taken = 0u64;
        for step in [1usize << 20, 4096] {
            let buf = vec![0x5au8; step];
            loop {
                match f.write_all(&buf).and_then(|_| f.sync_data()) {
                    Ok(()) => taken += step as u64,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => return Err(e).context("fill"),
                }
            }
        }
        Ok(taken)
    }

    /// Gives the space back.
    pub fn free(&self) -> Result<()> {
        match std::fs::remove_file(&self.filler) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(d) = self.dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&d).status();
            crate::cleanup::remove_mount(&d);
        }
        let _ = std::fs::remove_file(&self.image);
    }
}
