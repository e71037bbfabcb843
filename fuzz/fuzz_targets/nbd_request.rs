//! NBD transmission requests: `decode_request` on raw header bytes (round trip
//! through `encode_request`) and `validate_request` against an arbitrary export,
//! checking the guarantees the `Export` trait documents for what reaches it.
#![no_main]

use arbitrary::Arbitrary;
use ferry_nbd::proto::{self, Action, Request, REQUEST_LEN, REQUEST_MAGIC};
use ferry_nbd::ExportFlags;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    header: [u8; REQUEST_LEN],
    /// Force the magic so the fields behind it get exercised too.
    force_magic: bool,
    size: u64,
    flags: u8,
    max_payload: u32,
}

fuzz_target!(|input: Input| {
    let mut b = input.header;
    if input.force_magic {
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    let Ok(req) = proto::decode_request(&b) else {
        assert_ne!(b[0..4], REQUEST_MAGIC.to_be_bytes(), "good magic refused");
        return;
    };
    assert_eq!(proto::encode_request(&req), b, "decode/encode round trip");
    let f = ExportFlags {
        read_only: input.flags & 1 != 0,
        can_trim: input.flags & 2 != 0,
        can_write_zeroes: input.flags & 4 != 0,
        can_multi_conn: input.flags & 8 != 0,
        send_fua: input.flags & 16 != 0,
        send_flush: input.flags & 32 != 0,
    };
    if let Ok(action) = proto::validate_request(&req, input.size, &f, input.max_payload) {
        check_action(&req, action, input.size, &f, input.max_payload);
    }
});

/// What the server promises an export (see `ferry_nbd::Export`).
fn check_action(req: &Request, action: Action, size: u64, f: &ExportFlags, max_payload: u32) {
    let in_range = |offset: u64, len: u32| {
        assert!(len > 0, "zero-length call reaches the export: {req:?}");
        let end = offset.checked_add(u64::from(len)).expect("offset + len overflows");
        assert!(end <= size, "request beyond the export end: {req:?} size {size}");
    };
    match action {
        Action::Read { offset, len } => {
            in_range(offset, len);
            assert!(len <= max_payload);
        }
        Action::Write { offset, len, .. } => {
            in_range(offset, len);
            assert!(len <= max_payload);
            assert!(!f.read_only, "write on a read-only export");
        }
        Action::Trim { offset, len, .. } => {
            in_range(offset, len);
            assert!(!f.read_only && f.can_trim, "trim not advertised");
        }
        Action::WriteZeroes { offset, len, .. } => {
            in_range(offset, len);
            assert!(!f.read_only && f.can_write_zeroes, "write zeroes not advertised");
        }
        Action::Flush => assert!(f.send_flush, "flush not advertised"),
        Action::Noop | Action::Disconnect => {}
    }
    let fua = match action {
        Action::Write { fua, .. } | Action::Trim { fua, .. } | Action::WriteZeroes { fua, .. } => fua,
        _ => false,
    };
    assert!(!fua || f.send_fua, "FUA accepted without SEND_FUA");
}
