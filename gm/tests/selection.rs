//! Backend choice: `FERRY_GM_BACKEND` forces one for the process, otherwise the
//! fastest available runs; unavailable backends are refused, never run.

use ferry_gm::{Backend, Error, Sm4, Sm4Gcm, BACKEND_ENV};

#[test]
fn the_selected_backend_follows_the_environment() {
    let forced = std::env::var(BACKEND_ENV).ok();
    let selected = Backend::selected();
    match forced.as_deref().and_then(Backend::from_name) {
        Some(b) if b.is_available() => assert_eq!(selected, b),
        _ => assert_eq!(selected, Backend::detect()),
    }
    eprintln!("{BACKEND_ENV}={forced:?}: running {}", selected.name());
    assert_eq!(Sm4::new(&[0; 16]).backend(), selected);
    assert_eq!(Sm4Gcm::new(&[0; 16]).backend(), selected);
}

#[test]
fn detection_picks_the_fastest_available() {
    let best = Backend::ALL.into_iter().find(|b| b.is_available());
    assert_eq!(Some(Backend::detect()), best);
    assert!(Backend::Portable.is_available());
}

#[test]
fn names_round_trip_and_unavailable_backends_are_refused() {
    for b in Backend::ALL {
        assert_eq!(Backend::from_name(b.name()), Some(b));
        if !b.is_available() {
            assert_eq!(
                Sm4::with_backend(&[0; 16], b).unwrap_err(),
                Error::BackendUnavailable(b)
            );
        }
    }
    assert_eq!(Backend::from_name("avx1024"), None);
}
