//! ferryd's command line (clap), in the library so that the man page and shell
//! completion generator (`ferry-docgen`) renders the same definition the binary parses.
use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only when stderr is a terminal).
    Text,
    /// One JSON object per line, for journald and log shippers.
    Json,
}

#[derive(Parser)]
#[command(
    name = "ferryd",
    version,
    about = "ferry block replication daemon",
    long_about = "ferry block replication daemon: serves volumes over NBD on a primary, \
        journals every write and replicates it to standby sites over QUIC; a standby \
        applies the stream and keeps point-in-time recovery points.",
    after_help = "Logs go to stderr; FERRY_LOG sets the filter (e.g. FERRY_LOG=debug). \
        Control the running node with ferryctl --config FILE."
)]
pub struct Args {
    /// Node configuration (TOML), e.g. written by `ferryctl init`.
    #[arg(long, value_name = "FILE", required_unless_present = "check_config")]
    pub config: Option<PathBuf>,
    /// Validate FILE (syntax, keys, values) and exit: 0 and "config OK", or 1 and the
    /// error naming the key. Starts nothing and touches no file the node uses.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub check_config: Option<PathBuf>,
    /// Log format: text for terminals, json for journald and log shippers.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The clap command, for man pages and completions.
pub fn command() -> clap::Command {
    Args::command()
}
