//! The drill's hands: a view attached as a block device (nbdfuse exposes the NBD
//! export as a file, a loop device makes it a disk), mounted read-only, checked with
//! the filesystem's own fsck; and the operator's check command, bounded in time and
//! output. Everything it sets up, [`Attachment`]'s drop takes down again.
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How much of a check's output the report keeps (its end: where errors are).
pub const OUTPUT_TAIL: u64 = 16 << 10;

/// Runs `cmd`, returns its stdout trimmed; an error carries its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A view as a loop device, possibly mounted.
pub struct Attachment {
    fuse: Option<Child>,
    fuse_dir: PathBuf,
    loopdev: Option<String>,
    mnt: Option<PathBuf>,
}

impl Attachment {
    /// Exposes `uri` under `work/fuse` and attaches a (writable: a crash-consistent
    /// point may need its journal replayed, which writes into the view's scratch
    /// overlay) loop device to it.
    pub fn new(uri: &str, work: &Path) -> anyhow::Result<Attachment> {
        let fuse_dir = work.join("fuse");
        std::fs::create_dir_all(&fuse_dir)
            .with_context(|| format!("creating {}", fuse_dir.display()))?;
        let log = std::fs::File::create(work.join("nbdfuse.log"))?;
        let fuse = Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nbdfuse (Debian package nbdfuse)")?;
        let mut a = Attachment {
            fuse: Some(fuse),
            fuse_dir,
            loopdev: None,
            mnt: None,
        };
        a.wait_exposed(&work.join("nbdfuse.log"))?;
        let file = a.fuse_dir.join("nbd");
        let dev = run(Command::new("losetup")
            .args(["-f", "--show", "--direct-io=off"])
            .arg(&file))?;
        a.loopdev = Some(dev);
        Ok(a)
    }

    fn wait_exposed(&mut self, log: &Path) -> anyhow::Result<()> {
        let file = self.fuse_dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            let exited = match self.fuse.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.fuse = None;
                let why = std::fs::read_to_string(log).unwrap_or_default();
                bail!("nbdfuse exited ({status}): {}", why.trim());
            }
            if Instant::now() > deadline {
                bail!("nbdfuse did not expose the view within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap_or("")
    }

    /// The filesystem type blkid finds on the device.
    pub fn detect(&self) -> anyhow::Result<String> {
        let out = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(self.dev())
            .output()
            .context("running blkid (Debian package util-linux)")?;
        let fs = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if fs.is_empty() {
            bail!(
                "no filesystem found on the view ({}); give --check CMD for a volume that holds something else",
                self.dev()
            );
        }
        Ok(fs)
    }

    /// Mounts read-only on `mnt`; returns how many entries its root holds.
    pub fn mount_ro(&mut self, fs: &str, mnt: &Path) -> anyhow::Result<usize> {
        std::fs::create_dir_all(mnt)?;
        run(Command::new("mount")
            .args(["-o", "ro", "-t", fs])
            .arg(self.dev())
            .arg(mnt))?;
        self.mnt = Some(mnt.to_path_buf());
        let entries = std::fs::read_dir(mnt)
            .with_context(|| format!("listing the mounted view at {}", mnt.display()))?
            .count();
        Ok(entries)
    }

    pub fn unmount(&mut self) -> anyhow::Result<()> {
        if let Some(m) = self.mnt.take() {
            run(Command::new("umount").arg(&m))?;
        }
        Ok(())
    }

    /// The filesystem's own checker, changing nothing: (passed, command, output).
    pub fn fsck(&self, fs: &str) -> anyhow::Result<(bool, String, String)> {
        let dev = self.dev();
        let argv: Vec<&str> = match fs {
            "ext2" | "ext3" | "ext4" => vec!["e2fsck", "-f", "-n", dev],
            "xfs" => vec!["xfs_repair", "-n", dev],
            "btrfs" => vec!["btrfs", "check", "--readonly", dev],
            _ => vec!["fsck", "-n", "-t", fs, dev],
        };
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .with_context(|| format!("running {}", argv[0]))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text += &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), argv.join(" "), tail(&text)))
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(m) = self.mnt.take() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if let Some(d) = self.loopdev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&d).status();
        }
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.fuse.take() {
            // nbdfuse exits once unmounted; a stuck one is killed rather than waited on.
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The end of `text`, at most [`OUTPUT_TAIL`] bytes, cut at a character boundary.
fn tail(text: &str) -> String {
    let max = OUTPUT_TAIL as usize;
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!(
        "[... output cut to its last {max} bytes]\n{}",
        &text[start..]
    )
}

/// Runs the operator's check with `sh -c`, its output into `work/check.out`; returns
/// (passed, the output's tail). Killed after `timeout`.
pub fn run_command(
    cmd: &str,
    env: &[(&str, String)],
    work: &Path,
    timeout: Duration,
) -> anyhow::Result<(bool, String)> {
    let path = work.join("check.out");
    let out = std::fs::File::create(&path)?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting the check command with sh -c")?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = read_tail(&path)?;
    match status {
        Some(s) if s.success() => Ok((true, text)),
        Some(s) => {
            text += &format!("\n[check command exited: {s}]");
            Ok((false, text))
        }
        None => {
            text += &format!("\n[check command killed after {} s]", timeout.as_secs());
            Ok((false, text))
        }
    }
}

/// The last [`OUTPUT_TAIL`] bytes of a file, without reading the rest.
fn read_tail(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(OUTPUT_TAIL);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(if start > 0 {
        format!("[... output cut to its last {OUTPUT_TAIL} bytes]\n{text}")
    } else {
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_command_is_bounded_in_output_and_time() {
        let work = tempfile::tempdir().unwrap();
        let env = [("FERRY_DRILL_URI", "nbd://example/vol0".to_string())];
        let (ok, out) = run_command(
            "echo uri=$FERRY_DRILL_URI",
            &env,
            work.path(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(ok && out.contains("uri=nbd://example/vol0"), "{out}");

        let (ok, out) = run_command(
            "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo broken >&2; exit 3",
            &[],
            work.path(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(!ok);
        assert!(out.len() < OUTPUT_TAIL as usize + 200, "{}", out.len());
        assert!(out.contains("broken") && out.contains("exited"), "{out}");

        let (ok, out) =
            run_command("sleep 30", &[], work.path(), Duration::from_millis(300)).unwrap();
        assert!(!ok && out.contains("killed after"), "{out}");
    }

    #[test]
    fn tails_cut_at_character_boundaries() {
        let s = "é".repeat(OUTPUT_TAIL as usize);
        let t = tail(&s);
        assert!(t.starts_with("[... output cut"));
        assert!(t.len() <= OUTPUT_TAIL as usize + 64);
    }
}
