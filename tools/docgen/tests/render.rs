//! The generated man pages render (man -l, else groff, else mandoc) and the bash
//! completion loads in bash.
use std::path::Path;
use std::process::Command;

use ferry_testkit::{have, skip, skip_without};

fn docgen() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferry-docgen"))
}

fn generate(what: &str, dir: &Path) {
    let out = Command::new(docgen()).arg(what).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The formatter found here: `man -l`, `groff -man -Tutf8`, `mandoc`.
fn renderer() -> Option<Vec<&'static str>> {
    if have("man") && have("groff") {
        Some(vec!["man", "-l", "-P", "cat"])
    } else if have("groff") {
        Some(vec!["groff", "-man", "-Tutf8", "-ww"])
    } else if have("mandoc") {
        Some(vec!["mandoc", "-Tutf8", "-Wwarning"])
    } else {
        None
    }
}

#[test]
fn man_pages_render() {
    let Some(render) = renderer() else {
        skip(
            "man_pages_render",
            "none of man, groff, mandoc is installed (.ci/run installs groff)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    generate("man", dir.path());
    let mut pages = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let page = entry.unwrap().path();
        let out = Command::new(render[0])
            .args(&render[1..])
            .arg(&page)
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {err}", page.display());
        assert!(err.trim().is_empty(), "{}: warnings: {err}", page.display());
        assert!(
            text.contains("NAME") && text.lines().count() > 8,
            "{}:\n{text}",
            page.display()
        );
        pages += 1;
    }
    assert!(pages >= 18, "{pages} pages");
}

#[test]
fn completions_load_in_bash() {
    let dir = tempfile::tempdir().unwrap();
    generate("completions", dir.path());
    for f in ["_ferryctl", "_ferryd", "ferryctl.fish", "ferryd.fish"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    if skip_without("bash", "completions_load_in_bash") {
        return;
    }
    for f in ["ferryctl.bash", "ferryd.bash"] {
        let script = dir.path().join(f);
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -e; source '{}'; complete -p {}",
                script.display(),
                f.trim_end_matches(".bash")
            ))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let name = f.trim_end_matches(".bash");
        assert!(
            stdout.contains(&format!("-F _{name} {name}")),
            "{f}: {stdout}"
        );
    }
}
