//! Throughput of SM4-GCM, SM4-CTR and raw SM4 on 16 KiB messages for every backend
//! this CPU has, next to RustCrypto's table-based `sm4` (with `aes-gcm`'s generic GCM
//! and `ghash`, and `ctr`), plus SM3.
//!
//! `cargo bench -p ferry-gm --bench sm4 -- --warm-up-time 1 --measurement-time 3`

use aes_gcm::aead::{AeadInOut, KeyInit};
use cipher::{BlockCipherEncrypt, KeyIvInit, StreamCipher};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_gm::{Backend, Sm4, Sm4Ctr, Sm4Gcm};

const LEN: usize = 16 * 1024;
const KEY: [u8; 16] = [0x42; 16];
const NONCE: [u8; 12] = [0x24; 12];

fn backends() -> Vec<Backend> {
    Backend::ALL
        .into_iter()
        .filter(|b| b.is_available())
        .collect()
}

fn gcm(c: &mut Criterion) {
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

fn ctr(c: &mut Criterion) {
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

fn ecb(c: &mut Criterion) {
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

fn sm3(c: &mut Criterion) {
    let mut g = c.benchmark_group("sm3-16KiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    let buf = vec![0x5au8; LEN];
    g.bench_function("ferry-gm", |b| {
        b.iter(|| black_box(ferry_gm::sm3_digest(&buf)))
    });
    g.finish();
}

criterion_group!(benches, gcm, ctr, ecb, sm3);
criterion_main!(benches);
