//! Runs one operation on 16 KiB buffers many times, for `perf stat -e cycles:u` to turn
//! into cycles per byte independently of how busy the machine is:
//! `cargo run --release -p ferry-gm --example sm_throughput -- avx512-gfni gcm 20000`.
//! The `rc-gcm`, `rc-ctr` and `rc-ecb` operations run RustCrypto's table-based `sm4`
//! (with `aes-gcm`'s GCM and `ghash`, and `ctr`) for comparison; they ignore BACKEND.

use aes_gcm::aead::{AeadInOut, KeyInit};
use cipher::{BlockCipherEncrypt, KeyIvInit, StreamCipher};
use ferry_gm::{Backend, Sm4, Sm4Ctr, Sm4Gcm};
use std::hint::black_box;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: throughput BACKEND gcm|ctr|ecb|sm3|rc-gcm|rc-ctr|rc-ecb ITERATIONS";
    let (Some(backend), Some(op), Some(iters)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let Some(backend) = Backend::from_name(backend).filter(|b| b.is_available()) else {
        eprintln!("backend {backend} unknown or not available here");
        std::process::exit(2);
    };
    let Ok(iters) = iters.parse::<u64>() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let key = [0x42u8; 16];
    let mut buf = vec![0u8; 16 * 1024];
    let started = std::time::Instant::now();
    match op.as_str() {
        "gcm" => {
            let gcm = Sm4Gcm::with_backend(&key, backend).expect("available");
            for _ in 0..iters {
                black_box(
                    gcm.seal_in_place(&[1; 12], b"aad", &mut buf)
                        .expect("length"),
                );
            }
        }
        "ctr" => {
            for _ in 0..iters {
                let mut ctr = Sm4Ctr::with_backend(&key, &[0; 16], backend).expect("available");
                ctr.apply_keystream(&mut buf);
            }
        }
        "ecb" => {
            let sm4 = Sm4::with_backend(&key, backend).expect("available");
            let blocks: &mut [[u8; 16]] = &mut vec![[0u8; 16]; 1024];
            for _ in 0..iters {
                sm4.encrypt_blocks(blocks);
            }
        }
        "rc-gcm" => {
            let rc = aes_gcm::AesGcm::<sm4::Sm4, cipher::consts::U12>::new_from_slice(&key)
                .expect("key");
            for _ in 0..iters {
                black_box(rc.encrypt_inout_detached(
                    (&[1; 12]).into(),
                    b"aad",
                    buf.as_mut_slice().into(),
                ))
                .expect("length");
            }
        }
        "rc-ctr" => {
            for _ in 0..iters {
                let mut ctr = ctr::Ctr128BE::<sm4::Sm4>::new((&key).into(), (&[0; 16]).into());
                ctr.apply_keystream(&mut buf);
            }
        }
        "rc-ecb" => {
            let rc = sm4::Sm4::new_from_slice(&key).expect("key");
            for _ in 0..iters {
                for block in buf.chunks_exact_mut(16) {
                    let block: &mut [u8; 16] = block.try_into().expect("16 bytes");
                    rc.encrypt_block(block.into());
                }
            }
        }
        "sm3" => {
            for _ in 0..iters {
                black_box(ferry_gm::sm3_digest(&buf));
            }
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = iters as f64 * buf.len() as f64;
    println!(
        "{} {op}: {:.0} MB/s wall clock",
        backend.name(),
        bytes / secs / 1e6
    );
}
