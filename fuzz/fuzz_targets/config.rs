//! The TOML configuration (`ferry_api::config::Config`): any text parses or is
//! refused with a message, validation never panics, and what parses serialises
//! back to TOML that parses again to the same configuration (compared through
//! its serialisation: `Config` has no `PartialEq`).
#![no_main]

use ferry_api::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::parse(text) else {
        return;
    };
    let _ = cfg.validate();
    let _ = (cfg.pit(), cfg.undo_dir(), cfg.nbd_addr(), cfg.cluster_id());
    let toml = cfg.to_toml();
    let again = Config::parse(&toml)
        .unwrap_or_else(|e| panic!("serialised config does not parse: {e}\n{toml}"));
    assert_eq!(again.to_toml(), toml, "config TOML round trip");
});
