//! ferryctl's command line (clap): the definition the binary parses and the man page
//! and completion generator (`ferry-docgen`) renders.
//!
//! The doc comments here are the `--help` text and the man page, where `[cluster]` or
//! `[encryption]` names a table of the config file: not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use ferry_api::control;

#[derive(Parser)]
#[command(name = "ferryctl", version, about = "ferry operator CLI")]
pub struct Cli {
    /// The node's config file (for commands that talk to a running ferryd).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    /// A write is acknowledged once the standby has it durably (bounded by
    /// replication.sync_timeout_ms, then the target degrades to async).
    Sync,
    /// Writes are acknowledged locally and shipped behind.
    Async,
}

/// `ferryctl init --crypto`: which kind of cluster CA to create.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum CryptoArg {
    /// ECDSA P-256 certificates, the standard TLS 1.3 suites.
    Standard,
    /// SM2 certificates, the national suites of RFC 8998.
    Gm,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create a node directory: DIR/primary.toml and DIR/primary/ with sparse volume files.
    Init {
        /// Directory to create the node configs (NAME.toml), data directories and CA in.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A volume NAME:SIZE, e.g. vol0:1GiB (units B, KiB, MiB, GiB, TiB); repeatable.
        #[arg(long = "volume", value_name = "NAME:SIZE", required = true)]
        volumes: Vec<String>,
        /// NBD listen address HOST:PORT (numeric host; port 0: any free port). Standbys
        /// on the same host get the following ports.
        #[arg(long, value_name = "HOST:PORT")]
        nbd: String,
        /// Journal size (a size with unit, e.g. 1GiB): writes wait while it is full.
        #[arg(long, value_name = "SIZE", default_value = "1GiB")]
        journal_size: String,
        /// Journal segment size: the unit of reclaim (the journal holds at least two).
        #[arg(long, value_name = "SIZE", default_value = "64MiB")]
        segment_size: String,
        /// The primary's replication (QUIC) address HOST:PORT; needed with --standby.
        #[arg(long, value_name = "HOST:PORT")]
        primary: Option<String>,
        /// A standby site NAME=HOST:PORT (its QUIC address), optionally with its own
        /// mode: NAME=HOST:PORT/sync or /async; repeatable. Every node's config lists
        /// every node ([cluster]): after a failover the others follow the new primary.
        /// Cascading: NAME=HOST:PORT@via=RELAY makes another standby (RELAY) ship to
        /// this one instead of the primary (async; `via` in [[cluster.node]]).
        #[arg(long = "standby", value_name = "NAME=HOST:PORT[/MODE][@via=RELAY]")]
        standbys: Vec<String>,
        /// Replication mode of every standby that does not name its own.
        #[arg(long, value_enum, default_value = "async")]
        mode: ModeArg,
        /// First loopback port of the metrics endpoints (/metrics, /healthz, /readyz):
        /// the primary gets it, each standby the next one. Default 9640, or 0 (any free
        /// port) when --nbd asks for port 0.
        #[arg(long, value_name = "PORT")]
        metrics_port: Option<u16>,
        /// Every node runs on this one host (a test or demo cluster): give each its own
        /// NBD port even when the addresses do not show it (loopback and identical
        /// hosts are detected anyway).
        #[arg(long)]
        same_host: bool,
        /// TLS suites of the replication link: "standard" (ECDSA P-256 certificates,
        /// AES/ChaCha) or "gm" (SM2 certificates, RFC 8998 TLS_SM4_GCM_SM3 with
        /// curveSM2 and sm2sig_sm3). The cluster CA's key decides what every node
        /// speaks; a gm node and a standard node refuse each other.
        #[arg(long, value_enum, default_value = "standard")]
        crypto: CryptoArg,
        /// Encrypt each node's journal and undo log at rest (SM4-GCM): writes a new
        /// key file NODE/atrest.key (mode 0600, one key per node) and sets
        /// [encryption] key_file in NODE.toml. Losing the key file loses them.
        #[arg(long)]
        encrypt: bool,
    },
    /// Create a key file for encryption at rest ([encryption] key_file): a new random
    /// SM4 key-encryption key, mode 0600, never over an existing file. Prints its key
    /// id (errors about a wrong key name it).
    Keygen {
        /// The key file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Key rotation for encryption at rest: add a new current key-encryption key to a
    /// key file (older keys stay, so data sealed under them stays readable), list
    /// its keys, or retire an older key once nothing stored needs it.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// The cold tier: restore a volume from an archive, or list what one holds. Reads
    /// the object store directly (no running ferryd needed); s3:// credentials and
    /// endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    /// AWS_ENDPOINT_URL.
    Archive {
        #[command(subcommand)]
        cmd: ArchiveCmd,
    },
    /// Grow a cluster made by `init`.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Show the node's role, journal and replication state.
    Status {
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The control audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Named recovery points.
    Bookmark {
        #[command(subcommand)]
        cmd: BookmarkCmd,
    },
    /// Point-in-time views on a standby.
    Pit {
        #[command(subcommand)]
        cmd: PitCmd,
    },
    /// Re-read the config file and apply what can change live (replication targets
    /// added or removed, a target's mode or address; access grants; PIT retention; the
    /// metrics endpoint); anything else is refused, naming the keys that need a restart
    /// and why, and nothing changes. SIGHUP does the same.
    Reload {
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Standby: stop following the primary (the replica stays as it is).
    Pause,
    /// Standby: follow the primary again after `pause`.
    Resume,
    /// Primary: compare the volumes with every streaming standby at one point of the
    /// stream while writes continue; lists differing ranges (exit 1 if any).
    Verify {
        /// Only this volume (default: every volume).
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Standby: become the primary of a new epoch (serves NBD, journals new writes).
    /// With [cluster], the other standbys follow it by themselves; it refuses when
    /// another reachable standby holds more, naming it.
    Promote {
        /// Roll back to a point first (RFC 3339 time).
        #[arg(long, value_name = "TIME", conflicts_with = "bookmark")]
        at: Option<String>,
        /// Roll back to a bookmark first.
        #[arg(long)]
        bookmark: Option<String>,
        /// Promote even while the current primary is connected (it is fenced when it
        /// next reaches this node), or although this standby lost sync (a sync target
        /// its primary degraded: writes acknowledged since may be missing here), or
        /// although another reachable standby holds more (its extra writes are lost).
        #[arg(long)]
        force: bool,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Outdated primary: rejoin as a standby of the node that superseded it.
    Demote {
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Primary: hand the primary role to a caught-up standby without losing a write.
    Switchover {
        /// The standby to hand over to (needed when there are several).
        #[arg(long)]
        to: Option<String>,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Standby: roll the replica back to a point (pauses replication for good:
    /// afterwards promote the node or re-seed it).
    Rollback {
        /// The volume to roll back (with --group: any volume of the group).
        #[arg(long, value_name = "NAME")]
        volume: String,
        #[command(flatten)]
        point: PointArgs,
        /// Confirm that every volume of the consistency group is rolled back.
        #[arg(long)]
        group: bool,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Standby: a disaster-recovery drill. Exports a writable view of a recovery point
    /// (replication goes on), checks it, measures the recovery time (start to usable
    /// view) and the point's age (the RPO it proves), tears everything down, records
    /// the result in the node's audit log and prints or writes a report. Exits 1 when
    /// the drill fails.
    Drill {
        /// The volume to drill.
        #[arg(long, value_name = "NAME")]
        volume: String,
        #[command(flatten)]
        point: DrillPointArgs,
        /// Your own check, run with `sh -c` (exit 0: passed), with the view in its
        /// environment: FERRY_DRILL_URI (NBD URI), FERRY_DRILL_VOLUME, FERRY_DRILL_SEQ,
        /// FERRY_DRILL_POINT_TIME. Default: attach the view (nbdfuse + loop device, needs
        /// root), detect its filesystem, mount it read-only, and fsck it changing nothing.
        #[arg(long, value_name = "CMD")]
        check: Option<String>,
        /// Longest the check may run, in seconds, before it is killed and fails.
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        check_timeout: u64,
        /// Write the report as JSON to FILE and as a self-contained HTML page next to
        /// it (FILE with the extension .html).
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Print the report as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The point a drill exports: at most one of these; none means the newest.
#[derive(clap::Args)]
#[group(required = false, multiple = false)]
pub struct DrillPointArgs {
    /// The newest point the standby holds (the default): proves today's RPO.
    #[arg(long)]
    pub latest: bool,
    /// A bookmark (e.g. one taken with the application quiesced).
    #[arg(long)]
    pub bookmark: Option<String>,
    /// The newest point at or before a time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
}

/// Exactly one way to name a recovery point.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct PointArgs {
    /// A time (RFC 3339, e.g. 2026-11-24T20:15:00+08:00): the newest point at or before it.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// A write-set boundary sequence.
    #[arg(long)]
    pub seq: Option<u64>,
    /// A bookmark name.
    #[arg(long)]
    pub bookmark: Option<String>,
}

impl PointArgs {
    pub fn spec(&self) -> control::PointSpec {
        match (&self.at, self.seq, &self.bookmark) {
            (Some(t), _, _) => control::PointSpec::At(t.clone()),
            (_, Some(s), _) => control::PointSpec::Seq(s),
            (_, _, Some(b)) => control::PointSpec::Bookmark(b.clone()),
            // clap's group makes one of them required.
            (None, None, None) => control::PointSpec::Seq(0),
        }
    }
}

#[derive(Subcommand)]
pub enum BookmarkCmd {
    /// Primary: seal the current write-set with NAME (it reaches every standby).
    Create {
        /// The bookmark's name (1-64 of A-Z a-z 0-9 . _ -).
        name: String,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Bookmarks known to this node: name, sequence, time.
    List {
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum PitCmd {
    /// The retained window, recent points, bookmarks and open views.
    List {
        /// How many recent points to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve a volume as it was at a point over NBD (no copy; replication continues).
    Export {
        /// The volume to serve.
        #[arg(long, value_name = "NAME")]
        volume: String,
        #[command(flatten)]
        point: PointArgs,
        /// NBD listen address HOST:PORT (port 0: any free port, printed).
        #[arg(long)]
        listen: String,
        /// Accept writes into a scratch overlay dropped at unexport.
        #[arg(long)]
        writable: bool,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop serving a view (the only one, or ID) and drop its overlay.
    Unexport {
        /// The view's id (from `pit export` or `pit list`); optional when one is open.
        id: Option<u64>,
        /// Stop every open view.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Append a new random key to the key file as its current key (written anew,
    /// mode 0600, renamed into place). ferryd reads the key file at start: after a
    /// restart new journal and undo segments and new archive objects are sealed
    /// under the new key; segments sealed under older keys stay readable.
    Rotate {
        /// The node's key file ([encryption] key_file).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
    /// The key ids in the key file: the current key and the older ones.
    List {
        /// The key file to read.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
    /// Remove an older key from the key file. Refused while a journal or undo
    /// segment of the node (--config) is sealed under it: retention releases those
    /// segments in time. An archive begun under the key needs it as long as the
    /// archive is kept (its chunk ids are keyed by it): not checked here.
    Retire {
        /// The key file to remove the key from (written anew, mode 0600).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// The key id to retire (16 hex digits, as `key list` prints it).
        #[arg(long, value_name = "ID")]
        id: String,
    },
}

#[derive(Subcommand)]
pub enum ArchiveCmd {
    /// Write volume NAME as it was at one archived point into FILE (created or
    /// overwritten; a block device is written in place). Every object is checked
    /// against the manifest's SM3 before use.
    Restore {
        /// The archive: s3://BUCKET/PREFIX or file:///DIR.
        #[arg(long, value_name = "URL")]
        url: String,
        /// The key file of an encrypted archive (the node's `[encryption] key_file`,
        /// mode 0600); an encrypted archive is refused without it, naming its key id.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// The volume to restore (its name in the archive, as in the primary's config).
        #[arg(long, value_name = "NAME")]
        volume: String,
        #[command(flatten)]
        point: ArchivePointArgs,
        /// Where to write the volume.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve volume NAME as it was at one archived point over NBD (read-only), straight
    /// from the archive: opening reads only the manifest, the base's chunk list and the
    /// extent indexes of the packs after the base (packs without one are read whole);
    /// chunks and packs are fetched, checked against their SM3 and cached on first read. Runs until SIGINT or SIGTERM. A read needing an object
    /// that is missing or changed fails with EIO, the object named on stderr.
    Export {
        /// The archive: s3://BUCKET/PREFIX or file:///DIR.
        #[arg(long, value_name = "URL")]
        url: String,
        /// The key file of an encrypted archive (the node's `[encryption] key_file`,
        /// mode 0600); an encrypted archive is refused without it, naming its key id.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// The volume to serve (default: the archive's only volume). Also the NBD
        /// export name.
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
        #[command(flatten)]
        point: ArchivePointArgs,
        /// Where to listen for NBD clients (port 0: any free port, printed).
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// Keep fetched chunks and pack bodies as files in DIR instead of in memory
        /// (removed at exit).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Bytes of fetched objects the cache keeps (least recently used evicted). Keep
        /// it above the archive's pack size (8 MiB by default): a pack body larger than
        /// the cache is fetched again for every read of its data.
        #[arg(long, value_name = "BYTES", default_value = "256MiB")]
        cache_bytes: String,
        /// Print the export's address and point as one JSON line (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Initialise a new standby from the archive: every volume of the node named by
    /// --config (a standby that never ran) is restored at one archived point into its
    /// volume file, and its ferryd, at its first start, begins its journal there. It
    /// then joins by streaming after that point, or, when its primary's journal no
    /// longer reaches back to it, by a resync that compares digests and copies only
    /// what differs, instead of a full initial sync. A foreign archive (another
    /// cluster, other volumes) is refused here; a point that is not of the primary's
    /// history (another epoch, past its newest sequence) is refused by the primary at
    /// the first connection, and status says so.
    Seed {
        /// The archive: s3://BUCKET/PREFIX or file:///DIR (the primary's archive target).
        #[arg(long, value_name = "URL")]
        url: String,
        /// The key file of an encrypted archive (default: the node's `[encryption]
        /// key_file`, which must be the primary's key).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        point: ArchivePointArgs,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The archive's newest manifest: generation, epoch, volumes, packs, bases and
    /// the newest point.
    List {
        /// The archive: s3://BUCKET/PREFIX or file:///DIR.
        #[arg(long, value_name = "URL")]
        url: String,
        /// The key file of an encrypted archive (the node's `[encryption] key_file`,
        /// mode 0600); an encrypted archive is refused without it, naming its key id.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Print the result as JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Exactly one archived point.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct ArchivePointArgs {
    /// The newest write-set the archive holds.
    #[arg(long)]
    pub latest: bool,
    /// A write-set boundary sequence.
    #[arg(long)]
    pub seq: Option<u64>,
    /// The newest point at or before a time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// The write-set a bookmark sealed.
    #[arg(long)]
    pub bookmark: Option<String>,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Add a standby NAME=HOST:PORT (its QUIC address): issues its certificate from the
    /// cluster CA in DIR/ca, writes DIR/NAME.toml and DIR/NAME/, and adds it as a target
    /// to DIR/primary.toml (appended; comments kept).
    Add {
        /// The new node, NAME=HOST:PORT.
        #[arg(value_name = "NAME=HOST:PORT")]
        node: String,
        /// The cluster directory `ferryctl init` made.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Replication mode of the new target (default: that of the first existing one).
        /// With a sync policy (replication.sync) in the primary's config: async by
        /// default, and sync appends the node to the policy (a restart applies it).
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// The new node shares a host with the others: give it its own NBD port.
        #[arg(long)]
        same_host: bool,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Check the audit log's hash chain across its rotated files: the log named by
    /// --config (`access.audit_log`, default `<metadata_dir>/audit.log`), by --file, or
    /// DIR/audit.log; and the signature of every checkpoint against the node's
    /// certificate (`[tls] cert` of --config, or --cert). Exits 1 naming the first bad
    /// file and line, or the first checkpoint whose signature fails; lists intents
    /// that have no outcome (an action a crash interrupted) and the unsigned tail.
    Verify {
        /// The audit log file itself (instead of --config); its rotated files
        /// (`PATH.NNNNNN`) are checked with it.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// The node's certificate (PEM) to check checkpoint signatures with, instead
        /// of `[tls] cert` of --config. Repeat it for the certificates a node had
        /// before a re-issue: each checkpoint names the one whose key signed it.
        #[arg(long, value_name = "PEM")]
        cert: Vec<PathBuf>,
        /// A directory holding `audit.log` and its rotated files (or the log file).
        #[arg(value_name = "DIR", conflicts_with = "file")]
        dir: Option<PathBuf>,
    },
}

/// The command as parsed and documented: the global `--config` is hidden under `init`,
/// which lays out new nodes and reads no config.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    // Global arguments reach the subcommands when the command is built.
    cmd.build();
    let cmd = cmd.mut_subcommand("init", |init| init.mut_arg("config", |a| a.hide(true)));
    cmd.mut_subcommand("node", |node| {
        node.mut_arg("config", |a| a.hide(true))
            .mut_subcommand("add", |add| add.mut_arg("config", |a| a.hide(true)))
    })
}

/// Parses the process arguments (exits with clap's message on a usage error).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
