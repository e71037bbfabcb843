//! NBD transmission requests: `decode_request_in` on raw header bytes in every
//! header mode (round trip through `encode_request` / `encode_extended_request`)
//! and `validate_request` against an arbitrary session, checking the guarantees
//! the `Export` trait documents for every call that reaches an export.
#![no_main]

use arbitrary::Arbitrary;
use ferry_nbd::proto::{
    self, Action, Caps, Mode, Request, Session, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC,
};
use ferry_nbd::ExportFlags;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    header: [u8; 32],
    mode: u8,
    /// Force the magic so the fields behind it get exercised too.
    force_magic: bool,
    size: u64,
    flags: u8,
    fast_zero: bool,
    block_status: bool,
    max_payload: u32,
}

fuzz_target!(|input: Input| {
    let mode = [Mode::Simple, Mode::Structured, Mode::Extended][usize::from(input.mode % 3)];
    let mut b = input.header;
    let magic = if mode == Mode::Extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if input.force_magic {
        b[0..4].copy_from_slice(&magic.to_be_bytes());
    }
    let b = &b[..mode.request_len()];
    let Ok(req) = proto::decode_request_in(mode, b) else {
        assert_ne!(b[0..4], magic.to_be_bytes(), "good magic refused");
        return;
    };
    let again = match mode {
        Mode::Extended => proto::encode_extended_request(&req).to_vec(),
        _ => proto::encode_request(&req).to_vec(),
    };
    assert_eq!(again, b, "decode/encode round trip");
    let f = ExportFlags {
        read_only: input.flags & 1 != 0,
        can_trim: input.flags & 2 != 0,
        can_write_zeroes: input.flags & 4 != 0,
        can_multi_conn: input.flags & 8 != 0,
        send_fua: input.flags & 16 != 0,
        send_flush: input.flags & 32 != 0,
    };
    let s = Session {
        size: input.size,
        caps: Caps { flags: f, mode },
        fast_zero: input.fast_zero,
        max_payload: input.max_payload,
        block_status: input.block_status,
    };
    let _ = req.payload_len(mode);
    if let Ok(action) = proto::validate_request(&req, &s) {
        check_action(&req, action, &s);
    }
});

/// What the server promises an export (see `ferry_nbd::Export`).
fn check_action(req: &Request, action: Action, s: &Session) {
    let f = &s.caps.flags;
    let in_range = |offset: u64, len: u64| {
        assert!(len > 0, "zero-length call reaches the export: {req:?}");
        let end = offset.checked_add(len).expect("offset + len overflows");
        assert!(
            end <= s.size,
            "request beyond the export end: {req:?} {s:?}"
        );
        assert_eq!(
            (offset, len),
            (req.offset, req.len),
            "action changed the range"
        );
    };
    let mut fua = false;
    match action {
        Action::Read { offset, len, .. } => {
            in_range(offset, u64::from(len));
            assert!(len <= s.max_payload);
        }
        Action::Write {
            offset,
            len,
            fua: f2,
        } => {
            in_range(offset, u64::from(len));
            assert!(len <= s.max_payload);
            assert!(!f.read_only, "write on a read-only export");
            fua = f2;
        }
        Action::Trim {
            offset,
            len,
            fua: f2,
        } => {
            in_range(offset, len);
            assert!(!f.read_only && f.can_trim, "trim not advertised");
            fua = f2;
        }
        Action::WriteZeroes {
            offset,
            len,
            fua: f2,
            ..
        } => {
            in_range(offset, len);
            assert!(
                !f.read_only && f.can_write_zeroes,
                "write zeroes not advertised"
            );
            fua = f2;
        }
        Action::Cache { offset, len } => in_range(offset, len),
        Action::BlockStatus { offset, len, .. } => {
            in_range(offset, len);
            assert!(s.block_status, "block status without base:allocation");
        }
        Action::Flush => assert!(f.send_flush, "flush not advertised"),
        Action::Noop | Action::Disconnect => {}
    }
    assert!(!fua || f.send_fua, "FUA accepted without SEND_FUA");
}
