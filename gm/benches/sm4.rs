//! Throughput of SM4-GCM, SM4-CTR and raw SM4 on 16 KiB messages for every backend
//! this CPU has, next to RustCrypto's table-based `sm4` (with `aes-gcm`'s generic GCM
//! and `ghash`, and `ctr`), plus SM3.
//!
//! `cargo bench -p ferry-gm --bench sm4 -- --warm-up-time 1 --measurement-time 3`
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so the
//! throughputs are per core, as the targets are stated, and a machine shared with
//! other work (time slices lost to other processes) does not scale them down. What
//! sharing still costs (a busy sibling hyperthread, caches) shows in the spread.

use aes_gcm::aead::{AeadInOut, KeyInit};
use cipher::{BlockCipherEncrypt, KeyIvInit, StreamCipher};
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_gm::{Backend, Sm4, Sm4Ctr, Sm4Gcm};
use std::time::Duration;

/// Criterion measurement of the calling thread's CPU time.
struct ThreadCpuTime {
    /// Only for its formatter (durations, and throughputs from them).
    wall: WallTime,
}

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID unavailable");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, started: Duration) -> Duration {
        thread_cpu_now().saturating_sub(started)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

type Crit = Criterion<ThreadCpuTime>;

fn config() -> Crit {
    Criterion::default().with_measurement(ThreadCpuTime { wall: WallTime })
}

const LEN: usize = 16 * 1024;
const KEY: [u8; 16] = [0x42; 16];
const NONCE: [u8; 12] = [0x24; 12];

fn backends() -> Vec<Backend> {
    Backend::ALL
        .into_iter()
        .filter(|b| b.is_available())
        .collect()
}

fn gcm(c: &mut Crit) {
    let mut g = c.benchmark_group("sm4-gcm-16KiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    let mut buf = vec![0u8; LEN];
    for backend in backends() {
        let gcm = Sm4Gcm::with_backend(&KEY, backend).expect("available backend");
        g.bench_function(BenchmarkId::new("ferry-gm", backend.name()), |b| {
            b.iter(|| black_box(gcm.seal_in_place(&NONCE, b"aad", &mut buf)))
        });
    }
    let rc = aes_gcm::AesGcm::<sm4::Sm4, cipher::consts::U12>::new_from_slice(&KEY).expect("key");
    g.bench_function("rustcrypto-sm4+ghash", |b| {
        b.iter(|| {
            black_box(rc.encrypt_inout_detached((&NONCE).into(), b"aad", buf.as_mut_slice().into()))
        })
    });
    g.finish();
}

/// QUIC packet payload sizes (an initial 1200-byte datagram's, and the 1452-byte
/// datagrams after path MTU discovery), sealed and opened as quinn's packet keys do;
/// the per-message costs (E(J0) for the tag, the last partial group) weigh here.
fn gcm_packets(c: &mut Crit) {
    for len in [1162usize, 1414] {
        let mut g = c.benchmark_group(format!("sm4-gcm-{len}B"));
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = vec![0u8; len];
        let header = [0x40u8; 22];
        for backend in backends() {
            let gcm = Sm4Gcm::with_backend(&KEY, backend).expect("available backend");
            g.bench_function(BenchmarkId::new("seal", backend.name()), |b| {
                b.iter(|| black_box(gcm.seal_in_place(&NONCE, &header, &mut buf)))
            });
            let mut sealed = vec![0u8; len];
            let tag = gcm
                .seal_in_place(&NONCE, &header, &mut sealed)
                .expect("seal");
            g.bench_function(BenchmarkId::new("open", backend.name()), |b| {
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    black_box(gcm.open_in_place(&NONCE, &header, &mut buf, &tag))
                })
            });
        }
        g.finish();
    }
}

fn ctr(c: &mut Crit) {
    let mut g = c.benchmark_group("sm4-ctr-16KiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    let mut buf = vec![0u8; LEN];
    for backend in backends() {
        g.bench_function(BenchmarkId::new("ferry-gm", backend.name()), |b| {
            b.iter(|| {
                let mut ctr =
                    Sm4Ctr::with_backend(&KEY, &[0; 16], backend).expect("available backend");
                ctr.apply_keystream(&mut buf);
            })
        });
    }
    g.bench_function("rustcrypto-sm4+ctr", |b| {
        b.iter(|| {
            let mut ctr = ctr::Ctr128BE::<sm4::Sm4>::new((&KEY).into(), (&[0; 16]).into());
            ctr.apply_keystream(&mut buf);
        })
    });
    g.finish();
}

fn ecb(c: &mut Crit) {
    let mut g = c.benchmark_group("sm4-blocks-16KiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    let mut blocks = vec![[0u8; 16]; LEN / 16];
    for backend in backends() {
        let sm4 = Sm4::with_backend(&KEY, backend).expect("available backend");
        g.bench_function(BenchmarkId::new("ferry-gm", backend.name()), |b| {
            b.iter(|| sm4.encrypt_blocks(&mut blocks))
        });
    }
    let rc = sm4::Sm4::new_from_slice(&KEY).expect("key");
    g.bench_function("rustcrypto-sm4", |b| {
        b.iter(|| {
            for block in blocks.iter_mut() {
                rc.encrypt_block(block.into());
            }
        })
    });
    g.finish();
}

fn sm3(c: &mut Crit) {
    let mut g = c.benchmark_group("sm3-16KiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    let buf = vec![0x5au8; LEN];
    g.bench_function("ferry-gm", |b| {
        b.iter(|| black_box(ferry_gm::sm3_digest(&buf)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = gcm, gcm_packets, ctr, ecb, sm3
}
criterion_main!(benches);
