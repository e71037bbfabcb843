//! The journal on a real, small ext4 file system that fills up (FORMAT.md,
//! "Storage faults"): creating and preallocating a segment hits ENOSPC, appends
//! block, and once space is freed they complete by themselves and a reopen has them
//! all. Needs root, `losetup`, `mkfs.ext4` and `mount` (skipped, loudly, otherwise).

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_journal::*;

const TEST: &str = "journal_waits_for_space_on_a_full_ext4";
const FS_MIB: u64 = 40;
const REC_LEN: usize = 64 << 10;

/// A loop-mounted ext4 image: unmounted and detached on drop, whatever happened.
struct LoopFs {
    _dir: tempfile::TempDir,
    dev: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl LoopFs {
    fn new(mib: u64) -> Result<LoopFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("fs.img");
        File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| e.to_string())?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let mut fs = LoopFs {
            _dir: dir,
            dev: None,
            mnt,
            mounted: false,
        };
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&image))?;
        fs.dev = Some(dev.clone());
        run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
        run(Command::new("mount").arg(&dev).arg(&fs.mnt))?;
        fs.mounted = true;
        Ok(fs)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(dev) = &self.dev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

/// Fills the file system with `path` until ENOSPC; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = File::create(path).unwrap();
    let mut n = 0u64;
    for chunk in [1usize << 20, 4096] {
        let buf = vec![0x5au8; chunk];
        loop {
            match f.write_all(&buf) {
                Ok(()) => n += chunk as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = f.sync_all();
    n
}

fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn journal_waits_for_space_on_a_full_ext4() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        ferry_testkit::skip(TEST, "needs root (losetup, mount)");
        return;
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount"] {
        if ferry_testkit::skip_without(tool, TEST) {
            return;
        }
    }
    let fs = match LoopFs::new(FS_MIB) {
        Ok(fs) => fs,
        Err(e) => {
            ferry_testkit::skip(TEST, &format!("cannot set up a loop-mounted ext4: {e}"));
            return;
        }
    };
    let dir = fs.mnt.join("journal");
    let mut o = opts(&dir, EngineChoice::Std);
    o.segment_size = 4 << 20;
    // Room for more segments than the file system holds: creation must hit ENOSPC.
    o.capacity = 64 << 20;
    let (j, _) = Journal::open(o.clone()).unwrap();
    let j = Arc::new(j);
    // The first spare is made before the ballast; every later one finds no space.
    wait_until("first spare ready", Duration::from_secs(20), || {
        j.stats().segments_zeroed >= 1
    });
    let ballast = fs.mnt.join("ballast");
    let filled = fill(&ballast);
    assert!(filled > 0);
    // 3 segments' worth: the writer needs new segments the helper cannot create.
    let total: Seq = 3 * (o.segment_size / REC_LEN as u64);
    let appender = {
        let j = j.clone();
        std::thread::spawn(move || {
            (1..=total)
                .map(|s| j.append_wait(Record::write(0, s * 4096, payload(s, REC_LEN))))
                .collect::<Vec<_>>()
        })
    };
    wait_until(
        "the journal waits for space",
        Duration::from_secs(60),
        || {
            // Appends that end while the file system is full failed instead of waiting.
            assert!(!appender.is_finished(), "appends ended while out of space");
            j.stats().waiting_for_space_since_ns != 0
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let stuck = j.durable_seq();
    assert!(
        stuck < total,
        "appends must block while the file system is full"
    );
    assert!(!appender.is_finished());
    assert!(j.stats().space_waits >= 1);
    // Space comes back: the appends complete by themselves.
    std::fs::remove_file(&ballast).unwrap();
    let results = appender.join().unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.as_ref().ok(), Some(&(i as Seq + 1)), "append {}", i + 1);
    }
    let st = j.stats();
    assert_eq!(st.waiting_for_space_since_ns, 0, "{st:?}");
    assert!(st.segments_zeroed >= 3, "{st:?}");
    drop(j);
    let (j, rep) = Journal::open(o).unwrap();
    assert_eq!(rep.last_seq, total, "{rep:?}");
    let mut expect = 1;
    for e in j.reader(0).unwrap() {
        let e = e.unwrap();
        assert_eq!((e.seq, &e.record.data), (expect, &payload(expect, REC_LEN)));
        expect += 1;
    }
    assert_eq!(expect, total + 1);
    drop(j);
    drop(fs);
}
