//! The status JSON is pinned: a fully populated snapshot of each role serialises to
//! the committed `tests/golden/status-*.json` (keys, nesting, types, `null` versus
//! absent), and that JSON deserialises back to the same snapshot.
use std::path::Path;

use ferry_api::status::*;

fn journal() -> JournalStatus {
    JournalStatus {
        used_bytes: 1 << 20,
        capacity_bytes: 64 << 20,
        engine: "io_uring".into(),
        fallback_reason: Some("io_uring_setup: EPERM".into()),
        first_seq: 3,
        batches: 40,
        records: 120,
        bytes_written: 2 << 20,
        write_seconds: 0.25,
    }
}

fn common(role: RoleStatus, targets: Vec<TargetStatus>, export: Option<&str>) -> NodeStatus {
    NodeStatus {
        node: "site-a".into(),
        epoch: 2,
        last_seq: 130,
        durable_seq: 128,
        applied_seq: 127,
        checkpoint_seq: 100,
        journal: journal(),
        volumes: vec![VolumeStatus {
            name: "vol0".into(),
            size_bytes: 64 << 20,
            path: "/var/lib/ferry/vol0.img".into(),
            export: export.map(String::from),
            cache: Some("writethrough-until-flush".into()),
            cache_effective: export.map(|_| "writeback".into()),
        }],
        targets,
        cluster: Vec::new(),
        role,
    }
}

fn primary() -> NodeStatus {
    let target = TargetStatus {
        name: "dr1".into(),
        address: "10.0.0.2:7000".into(),
        mode: "sync".into(),
        effective_mode: EffectiveMode::Degraded,
        state: "resyncing".into(),
        acked_seq: 90,
        applied_seq: 88,
        lag_bytes: 4096,
        lag_seconds: 1.5,
        rtt_us: 350,
        last_error: Some("timed out".into()),
        sync_loss_at: Some(85),
        writes_blocked: false,
        track: TrackStatus {
            tracking: "resyncing".into(),
            dirty_bytes: 1 << 16,
            resync_bytes: 1 << 15,
            resync_data_bytes: 1 << 14,
            points_lost: Some(PointsLost {
                after_seq: 80,
                through_seq: None,
            }),
        },
        wire: WireStatus {
            compress: "zstd".into(),
            level: 3,
            payload_bytes: 1 << 20,
            wire_bytes: 1 << 18,
            ratio: Some(4.0),
            compressed_frames: 12,
            zero_bytes: 1 << 16,
            max_bandwidth: Some(25_000_000),
            throttled_seconds: 0.5,
        },
    };
    common(
        RoleStatus::Primary(PrimaryStatus {
            failed: false,
            outdated: Some(OutdatedStatus {
                epoch: 3,
                by: "site-b".into(),
            }),
            writes_refused: Some("outdated".into()),
            fork_seq: Some(77),
            fork_by: Some("promotion".into()),
            sync_policy: None,
            archives: Vec::new(),
            nbd: NbdStatus {
                listen: "127.0.0.1:10809".into(),
            },
        }),
        vec![target],
        Some("nbd://127.0.0.1:10809/vol0"),
    )
}

fn standby() -> NodeStatus {
    let point = |seq, ns| PitPoint {
        seq,
        time: ferry_api::timefmt::format_rfc3339(ns),
        timestamp_ns: ns,
    };
    common(
        RoleStatus::Standby(Box::new(StandbyStatus {
            paused: Some("paused by an operator (ferryctl resume)".into()),
            apply_error: None,
            replica: ReplicaState::Inconsistent,
            resync: Some(ResyncStatus {
                from_seq: 10,
                snapshot_seq: 50,
                through_seq: Some(60),
                copied: true,
                copied_bytes: 8192,
                total_bytes: 16384,
            }),
            primary: UpstreamStatus {
                name: "primary".into(),
                listen: "10.0.0.2:7000".into(),
                connected: Some("10.0.0.1:40000".into()),
                last_seq: 131,
                last_error: None,
                via: None,
                source: None,
            },
            applied_primary_time_ns: 1_700_000_000_000_000_000,
            pit: PitStatus {
                enabled: true,
                window: Some(PitWindow {
                    dir: "/var/lib/ferry/undo".into(),
                    oldest: Some(point(12, 1_699_999_000_000_000_000)),
                    newest: None,
                    points: 30,
                    used_bytes: 1 << 20,
                    max_bytes: 4 << 30,
                    max_age_secs: 604_800,
                    capture_seconds: 0.125,
                    error: None,
                    open_views: vec![OpenView {
                        id: 1,
                        volume_id: 0,
                        seq: 40,
                    }],
                }),
                exports: Some(vec![PitExport {
                    id: 1,
                    volume: "vol0".into(),
                    seq: 40,
                    time: ferry_api::timefmt::format_rfc3339(1_699_999_500_000_000_000),
                    listen: "127.0.0.1:10810".into(),
                    writable: false,
                }]),
            },
            sync_loss_at: Some(120),
        })),
        Vec::new(),
        None,
    )
}

fn golden(name: &str, snapshot: &NodeStatus) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let got = serde_json::to_value(snapshot).unwrap();
    assert_eq!(
        got,
        want,
        "{name}: the snapshot serialises to\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
    let back: NodeStatus = serde_json::from_value(want).unwrap();
    assert_eq!(
        &back, snapshot,
        "{name} does not deserialise to the snapshot"
    );
}

#[test]
fn a_primary_snapshot_serialises_to_its_golden_json() {
    golden("status-primary.json", &primary());
}

#[test]
fn a_standby_snapshot_serialises_to_its_golden_json() {
    golden("status-standby.json", &standby());
}

#[test]
fn a_standby_without_pit_serialises_pit_as_disabled_only() {
    let mut s = standby();
    if let RoleStatus::Standby(sb) = &mut s.role {
        sb.pit = PitStatus::disabled();
        sb.resync = None;
    }
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["pit"], serde_json::json!({"enabled": false}));
    assert!(v["resync"].is_null() && v.as_object().unwrap().contains_key("resync"));
    assert_eq!(serde_json::from_value::<NodeStatus>(v).unwrap(), s);
}
