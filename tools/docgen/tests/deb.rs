//! The Debian package (packaging/deb/build.sh) builds from this workspace's binaries,
//! unpacks (`dpkg-deb -x`) into a scratch root with everything an operator needs in
//! the places Debian looks for it, and what it ships works there: the binaries run,
//! the man pages render, the bash completion loads.
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_testkit::{have, skip, skip_without};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory cargo put this package's binary in: `cargo test --workspace` builds
/// ferryd and ferryctl next to it.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ferry-docgen"))
        .parent()
        .expect("a binary path has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the package into `out` and returns its path.
fn build(out: &Path) -> PathBuf {
    let script = repo().join("packaging/deb/build.sh");
    let printed = run(Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out)
        .arg("--fast"));
    PathBuf::from(printed.trim())
}

#[test]
fn the_deb_installs_a_working_ferry_into_a_scratch_root() {
    if skip_without(
        "dpkg-deb",
        "the_deb_installs_a_working_ferry_into_a_scratch_root",
    ) {
        return;
    }
    let bins = bin_dir();
    if !bins.join("ferryd").exists() || !bins.join("ferryctl").exists() {
        skip(
            "the_deb_installs_a_working_ferry_into_a_scratch_root",
            &format!(
                "ferryd/ferryctl are not built in {} (run `cargo test --workspace`)",
                bins.display()
            ),
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let deb = build(tmp.path());
    let version = env!("CARGO_PKG_VERSION");
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    assert!(
        deb.is_file() && name.starts_with(&format!("ferry_{version}_")) && name.ends_with(".deb"),
        "{}",
        deb.display()
    );

    let info = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
    assert!(info.contains("Package: ferry\n"), "{info}");
    assert!(info.contains(&format!("Version: {version}\n")), "{info}");
    assert!(info.contains("Depends: libc6 (>= 2."), "{info}");

    let root = tmp.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    check_files(&root);
    check_binaries_run(&root);
    check_man_page_renders(&root);
    check_bash_completion_loads(&root);
}

fn check_files(root: &Path) {
    for f in [
        "usr/bin/ferryd",
        "usr/bin/ferryctl",
        "usr/lib/systemd/system/ferryd@.service",
        "usr/lib/systemd/system/ferry-drill@.service",
        "usr/lib/systemd/system/ferry-drill@.timer",
        "usr/lib/sysusers.d/ferry.conf",
        "usr/lib/tmpfiles.d/ferry.conf",
        "usr/share/man/man8/ferryd.8.gz",
        "usr/share/man/man8/ferryctl.8.gz",
        "usr/share/man/man8/ferryctl-promote.8.gz",
        "usr/share/man/man5/ferry.toml.5.gz",
        "usr/share/bash-completion/completions/ferryctl",
        "usr/share/zsh/vendor-completions/_ferryctl",
        "usr/share/fish/vendor_completions.d/ferryctl.fish",
        "usr/share/doc/ferry/copyright",
        "usr/share/doc/ferry/changelog.gz",
        "usr/share/doc/ferry/examples/primary.toml.example",
    ] {
        assert!(root.join(f).is_file(), "{f} missing from the package");
    }
    // The unit starts the binary where the package puts it.
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/ferryd@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/ferryd "), "{unit}");
}

fn check_binaries_run(root: &Path) {
    for bin in ["ferryd", "ferryctl"] {
        let out = run(Command::new(root.join("usr/bin").join(bin)).arg("--version"));
        assert!(out.contains(env!("CARGO_PKG_VERSION")), "{bin}: {out}");
    }
}

fn check_man_page_renders(root: &Path) {
    if !(have("man") && have("groff")) {
        skip(
            "the_deb_installs_a_working_ferry_into_a_scratch_root (man pages)",
            "man or groff is not installed (.ci/run installs groff)",
        );
        return;
    }
    let page = root.join("usr/share/man/man8/ferryctl-promote.8.gz");
    let text = run(Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(&page)
        .env("MANWIDTH", "80"));
    assert!(text.contains("NAME") && text.contains("promote"), "{text}");
}

fn check_bash_completion_loads(root: &Path) {
    if skip_without(
        "bash",
        "the_deb_installs_a_working_ferry_into_a_scratch_root",
    ) {
        return;
    }
    let script = root.join("usr/share/bash-completion/completions/ferryctl");
    let out = run(Command::new("bash").arg("-c").arg(format!(
        "set -e; source '{}'; complete -p ferryctl",
        script.display()
    )));
    assert!(out.contains("-F _ferryctl ferryctl"), "{out}");
}
