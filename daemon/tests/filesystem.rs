//! A real filesystem on a ferry volume: nbdfuse exposes the NBD export as a file, a
//! loop device turns it into a block device, ext4 goes on top. Files written and synced
//! must survive a SIGKILL of ferryd with the filesystem still mounted.
//!
//! Needs root, /dev/fuse, nbdfuse, losetup, mkfs.ext4 and mount; skips loudly without.
use std::path::Path;
use std::process::Command;

use ferryd::testkit::{primary_config, run, skip, skip_without, Attached, Node};

const MIB: u64 = 1 << 20;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

fn content(i: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..(64 << 10) + i * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn ext4_on_a_ferry_volume_survives_sigkill() {
    for tool in ["nbdfuse", "losetup", "mkfs.ext4", "mount", "fusermount3"] {
        if skip_without(tool, "ext4_on_a_ferry_volume_survives_sigkill") {
            return;
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        skip(
            "ext4_on_a_ferry_volume_survives_sigkill",
            "needs root and /dev/fuse",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 128 * MIB)], 64 * MIB, 4 * MIB);
    let mut node = Node::start(ferryd(), &cfg);
    let mnt = dir.path().join("mnt");
    {
        let mut att = Attached::new(&node.url("vol0"), dir.path(), false);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(att.dev()));
        att.mount(&mnt, &[]);
        for i in 0..24 {
            std::fs::write(mnt.join(format!("f{i}")), content(i)).unwrap();
        }
        run(Command::new("sync").arg("-f").arg(mnt.join("f0")));
        // Unsynced writes after this point may or may not survive; synced ones must.
        std::fs::write(mnt.join("unsynced"), b"maybe").unwrap();
        node.kill();
    }
    let node = Node::start(ferryd(), &cfg);
    let mut att = Attached::new(&node.url("vol0"), dir.path(), false);
    // Mounting replays ext4's own journal; then fsck must find nothing wrong.
    att.mount(&mnt, &[]);
    for i in 0..24 {
        let got = std::fs::read(mnt.join(format!("f{i}"))).unwrap();
        assert!(
            got == content(i),
            "file f{i} differs after SIGKILL + restart"
        );
    }
    run(Command::new("umount").arg(&mnt));
    att.mnt = None;
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(att.dev())
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck found problems: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}
