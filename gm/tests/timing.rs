//! Timing-leak tests in the dudect style: time an operation on two classes of secret
//! input (class 0 fixed, class 1 random), interleaved at random, and compare the two
//! timing distributions with Welch's t-test. Constant-time code keeps |t| small
//! however many samples; a leak grows |t| with the sample count. Fails at |t| > 10.
//!
//! The default run is short (it only catches gross leaks, and stays reliable on a
//! loaded shared machine); `FERRY_GM_DUDECT_LONG=1` takes 50x more samples. A control
//! with a deliberate data-dependent branch checks that the harness does see leaks.

mod common;

use common::backends;
use ferry_gm::{Backend, Sm4, Sm4Gcm};
use std::hint::black_box;
use std::time::Instant;

const T_LIMIT: f64 = 10.0;

fn samples() -> usize {
    let base = 20_000;
    if std::env::var_os("FERRY_GM_DUDECT_LONG").is_some() {
        base * 50
    } else {
        base
    }
}

/// xorshift64*: test inputs only.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = Instant::now().elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes16(&mut self) -> [u8; 16] {
        let v = (u128::from(self.next()) << 64) | u128::from(self.next());
        v.to_le_bytes()
    }
}

/// Welch's t over the measurements at or below the pooled `keep` quantile (dudect
/// crops the tail, where preemption and interrupts land).
fn welch_t(times: &[(bool, u64)], keep: f64) -> f64 {
    let mut sorted: Vec<u64> = times.iter().map(|t| t.1).collect();
    sorted.sort_unstable();
    let cut = sorted[((sorted.len() as f64 * keep) as usize).min(sorted.len() - 1)];
    let mut stats = [(0f64, 0f64, 0f64); 2]; // (n, mean, m2), Welford
    for &(class, t) in times.iter().filter(|t| t.1 <= cut) {
        let s = &mut stats[usize::from(class)];
        s.0 += 1.0;
        let d = t as f64 - s.1;
        s.1 += d / s.0;
        s.2 += d * (t as f64 - s.1);
    }
    let [(n0, m0, q0), (n1, m1, q1)] = stats;
    if n0 < 2.0 || n1 < 2.0 {
        return 0.0;
    }
    let se = (q0 / (n0 - 1.0) / n0 + q1 / (n1 - 1.0) / n1).sqrt();
    if se == 0.0 {
        return 0.0;
    }
    (m0 - m1) / se
}

/// Times `op` on class-0 input `fixed` and class-1 random inputs, interleaved at
/// random; returns the largest |t| over a few cropping levels.
fn measure(mut op: impl FnMut(&[u8; 16]), fixed: [u8; 16]) -> f64 {
    let n = samples();
    let mut rng = Rng::new();
    let inputs: Vec<(bool, [u8; 16])> = (0..n)
        .map(|_| {
            let class = rng.next() & 1 == 1;
            (class, if class { rng.bytes16() } else { fixed })
        })
        .collect();
    // Warm up caches and frequency.
    for (_, input) in inputs.iter().take(n / 10) {
        op(input);
    }
    let mut times = Vec::with_capacity(n);
    for (class, input) in &inputs {
        let start = Instant::now();
        op(input);
        times.push((*class, start.elapsed().as_nanos() as u64));
    }
    [0.5, 0.75, 0.9, 0.99]
        .iter()
        .map(|&keep| welch_t(&times, keep).abs())
        .fold(0.0, f64::max)
}

fn check(what: &str, backend: Backend, t: f64) {
    eprintln!(
        "{what} on {}: max |t| = {t:.2} over {} samples",
        backend.name(),
        samples()
    );
    assert!(
        t < T_LIMIT,
        "{what} on {}: |t| = {t:.2} looks like a timing leak",
        backend.name()
    );
}

#[test]
fn sm4_encryption_time_does_not_depend_on_the_plaintext() {
    for backend in backends() {
        let sm4 = Sm4::with_backend(&[0x11; 16], backend).unwrap();
        let t = measure(
            |input| {
                let mut blocks = [*input; 16];
                sm4.encrypt_blocks(&mut blocks);
                black_box(blocks);
            },
            [0; 16],
        );
        check("SM4 plaintext", backend, t);
    }
}

#[test]
fn sm4_key_schedule_and_encryption_time_does_not_depend_on_the_key() {
    for backend in backends() {
        let t = measure(
            |key| {
                let sm4 = Sm4::with_backend(key, backend).unwrap();
                let mut block = [0x33; 16];
                sm4.encrypt_block(&mut block);
                black_box(block);
            },
            [0; 16],
        );
        check("SM4 key", backend, t);
    }
}

#[test]
fn gcm_open_time_does_not_depend_on_where_the_tag_differs() {
    for backend in backends() {
        let gcm = Sm4Gcm::with_backend(&[0x22; 16], backend).unwrap();
        let mut ct = [0u8; 64];
        let tag = gcm.seal_in_place(&[0; 12], b"", &mut ct).unwrap();
        // Class 0 is wrong in its last byte only, class 1 anywhere at random.
        let mut fixed = tag;
        fixed[15] ^= 1;
        let t = measure(
            |candidate| {
                let mut buf = ct;
                black_box(
                    gcm.open_in_place(&[0; 12], b"", &mut buf, candidate)
                        .is_err(),
                );
            },
            fixed,
        );
        check("GCM tag check", backend, t);
    }
}

/// The control: a function that does extra work for an all-zero first byte must be
/// caught, or the tests above prove nothing.
#[test]
fn the_harness_detects_a_data_dependent_branch() {
    let sm4 = Sm4::with_backend(&[0x44; 16], Backend::Portable).unwrap();
    let t = measure(
        |input| {
            let mut block = *input;
            sm4.encrypt_block(&mut block);
            if input[0] == 0 {
                sm4.encrypt_block(&mut block);
            }
            black_box(block);
        },
        [0; 16],
    );
    eprintln!("leaky control: max |t| = {t:.2}");
    assert!(
        t > T_LIMIT,
        "the harness missed a 2x data-dependent slowdown (|t| = {t:.2})"
    );
}
