//! `ferry-docgen`: writes the man pages and shell completions of ferryd and ferryctl
//! from the clap definitions the binaries parse (`ferryd::cli`, `ferryctl::cli`), plus
//! the hand-written `ferry.toml(5)`, so the documentation cannot drift from the flags.
//! `ferry.toml(5)`'s RELOAD section is written from [`ferry_api::keys::KEYS`], the
//! table the daemon's reload classifies changes with, and the page's per-key
//! `live`/`restart` markers are checked against it (the tests below).
//!
//! `ferry-docgen man DIR` writes `ferryd.8`, `ferryctl.8`, one `ferryctl-SUB.8` per
//! subcommand and `ferry.toml.5`; `ferry-docgen completions DIR` writes bash, zsh and
//! fish completions for both commands.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use clap_complete::Shell;

/// The configuration file page, written by hand from the README's table.
const FERRY_TOML_5: &str = include_str!("../man/ferry.toml.5");

/// `ferry.toml(5)`: the hand-written page with its RELOAD section, written from the
/// reload's own table, before EXAMPLE.
fn ferry_toml_5() -> String {
    let at = FERRY_TOML_5
        .find(".SH EXAMPLE")
        .unwrap_or(FERRY_TOML_5.len());
    format!(
        "{}{}{}",
        &FERRY_TOML_5[..at],
        reload_section(),
        &FERRY_TOML_5[at..]
    )
}

/// Which keys `ferryctl reload` applies, and for the others why a restart is needed,
/// from [`ferry_api::keys::KEYS`].
fn reload_section() -> String {
    use ferry_api::keys::{Change, KEYS};
    let join = |keys: Vec<&str>| keys.join(", ");
    let live: Vec<&str> = KEYS
        .iter()
        .filter(|k| k.change.is_live())
        .map(|k| k.key)
        .collect();
    let mut text = format!(
        ".SH RELOAD\n\
         .nh\n\
         .ad l\n\
         .B ferryctl reload\n\
         (or SIGHUP, which\n\
         .B systemctl reload\n\
         sends) re-reads this file. It checks every change first, then applies the live\n\
         ones in order \\(em targets, the metrics endpoint (the new address is bound\n\
         before the old one closes), access grants (from the next control request),\n\
         retention (at once) \\(em each recorded in the audit log. A change to any other\n\
         key refuses the whole reload, naming the key and the reason below, and nothing\n\
         changes. Archive targets are not reloaded.\n\
         .TP\n\
         .B live\n\
         {}\n",
        join(live)
    );
    let mut reasons: Vec<&str> = Vec::new();
    for k in KEYS {
        if let Change::Restart(why) = k.change {
            if !reasons.contains(&why) {
                reasons.push(why);
            }
        }
    }
    for why in reasons {
        let keys = KEYS
            .iter()
            .filter(|k| k.change == Change::Restart(why))
            .map(|k| k.key)
            .collect();
        text.push_str(&format!(
            ".TP\n.BR restart \" \\(em {why}\"\n{}\n",
            join(keys)
        ));
    }
    // Key names are neither hyphenated nor spread (above); the rest of the page is as before.
    text.push_str(".hy\n.ad b\n");
    text
}

#[derive(Parser)]
#[command(
    name = "ferry-docgen",
    about = "writes ferry's man pages and shell completions"
)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Man pages (section 8 for the commands, 5 for the config file) into DIR.
    Man {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
    /// bash, zsh and fish completions for ferryd and ferryctl into DIR.
    Completions {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().what {
        What::Man { dir } => {
            for written in man_pages(&dir)? {
                println!("{}", written.display());
            }
        }
        What::Completions { dir } => {
            for written in completions(&dir)? {
                println!("{}", written.display());
            }
        }
    }
    Ok(())
}

/// Writes every man page into `dir`; returns the paths written.
fn man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for cmd in [ferryd::cli::command(), ferryctl::cli::command()] {
        let name = cmd.get_name().to_string();
        page(dir, &name, cmd, &mut written)?;
    }
    let conf = dir.join("ferry.toml.5");
    std::fs::write(&conf, ferry_toml_5()).with_context(|| format!("writing {}", conf.display()))?;
    written.push(conf);
    Ok(written)
}

/// `NAME.8` for `cmd`, then `NAME-SUB.8` for each subcommand, recursively.
fn page(
    dir: &Path,
    name: &str,
    cmd: clap::Command,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let cmd = cmd.name(name.to_string()).bin_name(name.replace('-', " "));
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("ferry")
        .source(format!("ferry {}", env!("CARGO_PKG_VERSION")))
        .render(&mut text)
        .with_context(|| format!("rendering {name}(8)"))?;
    let path = dir.join(format!("{name}.8"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        page(
            dir,
            &format!("{name}-{}", sub.get_name()),
            sub.clone(),
            written,
        )?;
    }
    Ok(())
}

/// Writes the completion scripts into `dir`; returns the paths written.
fn completions(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for mut cmd in [ferryd::cli::command(), ferryctl::cli::command()] {
        let name = cmd.get_name().to_string();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let path = clap_complete::generate_to(shell, &mut cmd, &name, dir)
                .with_context(|| format!("writing the {shell} completion of {name}"))?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_subcommand_and_the_config_page() {
        let dir = tempfile::tempdir().unwrap();
        let pages = man_pages(dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "ferryd.8",
            "ferryctl.8",
            "ferryctl-init.8",
            "ferryctl-pit-export.8",
            "ferryctl-bookmark-create.8",
            "ferry.toml.5",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        let ferryd = std::fs::read_to_string(dir.path().join("ferryd.8")).unwrap();
        assert!(ferryd.contains("check\\-config"), "{ferryd}");
        let init = std::fs::read_to_string(dir.path().join("ferryctl-init.8")).unwrap();
        assert!(init.contains("metrics\\-port"), "{init}");
        assert!(
            !init.contains("\\-\\-config"),
            "init reads no config: {init}"
        );
    }

    /// The `.BR` line documenting `key` (`pit.max_bytes`): in the key's section, the
    /// first `.TP` entry naming its last part (`max_bytes`), else an earlier part
    /// (`admins` for `access.admins.uids`).
    fn entry_of<'a>(page: &'a str, key: &str) -> Option<&'a str> {
        let parts: Vec<&str> = key.split('.').collect();
        let mut section = None;
        let mut entries = Vec::new();
        let mut after_tp = false;
        for line in page.lines() {
            if let Some(h) = line.strip_prefix(".SH ") {
                let name = h.trim_matches('"').trim_start_matches('[');
                section = name.split(']').next().map(str::to_string);
            } else if after_tp && line.starts_with(".BR ") && section.as_deref() == Some(parts[0]) {
                entries.push(line);
            }
            after_tp = line == ".TP";
        }
        // The names, without the `(type, default; live)` descriptor.
        let words = |l: &str| -> Vec<String> {
            let names = l.find(" (").map_or(l, |at| &l[..at]);
            names
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map(str::to_string)
                .collect()
        };
        parts[1..].iter().rev().find_map(|p| {
            entries
                .iter()
                .copied()
                .find(|l| words(l).iter().any(|w| w == p))
        })
    }

    /// Every key of the reload's table is documented in `ferry.toml(5)` and marked
    /// `live` or `restart` as the table says; the RELOAD section lists each key.
    #[test]
    fn the_config_page_marks_every_key_as_the_reload_applies_it() {
        let page = ferry_toml_5();
        for k in ferry_api::keys::KEYS {
            let line = entry_of(&page, k.key)
                .unwrap_or_else(|| panic!("{} is not documented in ferry.toml(5)", k.key));
            let (want, not) = if k.change.is_live() {
                ("live)", "restart)")
            } else {
                ("restart)", "live)")
            };
            assert!(
                line.contains(want) && !line.contains(not),
                "{}: ferry.toml(5) says `{line}`, the reload: {:?}",
                k.key,
                k.change
            );
        }
        let reload = &page[page.find(".SH RELOAD").unwrap()..];
        for k in ferry_api::keys::KEYS {
            assert!(reload.contains(k.key), "{} not in RELOAD", k.key);
        }
    }
}
