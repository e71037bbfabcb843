//! `ferry-docgen`: writes the man pages and shell completions of ferryd and ferryctl
//! from the clap definitions the binaries parse (`ferryd::cli`, `ferryctl::cli`), plus
//! the hand-written `ferry.toml(5)`, so the documentation cannot drift from the flags.
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
    std::fs::write(&conf, FERRY_TOML_5).with_context(|| format!("writing {}", conf.display()))?;
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
}
