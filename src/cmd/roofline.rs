//! The roofline of `gpo bench step`: how many operations a step does, how fast it does
//! them, and how fast this machine's matrix kernels can go on the same shapes, so the gap
//! between a step and the hardware is a measured ratio and not a guess.
//!
//! The peak is measured, not looked up: every distinct matrix product of one step
//! ([`gpo_core::model::flops::sharded_step_gemms`]) runs through candle's CPU matmul (the kernel the
//! step uses, single-threaded as the trainer runs it), on `threads` threads at once so that
//! they share caches and memory bandwidth as the step's shards do. Operands are contiguous:
//! the backward's transposed products are timed as plain ones of the same sizes. Each
//! shape's speed is the best of [`ROUNDS`] rounds: a peak is what the machine reaches, and
//! on a shared machine single rounds swung by a fifth.
//!
//! Each shape is timed twice: with its operands in the caches (the same two matrices
//! every call: [`Operands::Cached`]) and with them in memory (every call on its own copy,
//! the copies together larger than any last-level cache: [`Operands::FromMemory`]). A
//! step's products read activations the forward pass wrote tens of megabytes earlier, so
//! they run between the two: the cached peak is as far as these kernels go, and the peak
//! from memory is what they give a step that keeps every activation for its backward.

use anyhow::Result;
use candle_core::{Device, Tensor};
use gpo_core::model::flops::Gemm;
use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Timed rounds per product shape; the fastest counts.
pub const ROUNDS: usize = 5;

/// Bytes of operand copies each thread cycles through for [`Operands::FromMemory`]: twice
/// the largest last-level cache of the machines this project measured (32 MiB), so no
/// copy is still cached when its turn comes again.
const FROM_MEMORY_BYTES: usize = 64 << 20;

/// Where a timed product's operands are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operands {
    /// The same operands every call: after the first, they come from the caches.
    Cached,
    /// Every call on operands no call has touched since they left the caches.
    FromMemory,
}

/// Operations per second of `threads` concurrent copies of `g`, in GFLOP/s (all threads):
/// the best of up to [`ROUNDS`] rounds of at least 25 ms each (fewer once a quarter second
/// has gone).
pub fn gemm_gflops(g: Gemm, threads: usize, operands: Operands) -> Result<f64> {
    // Large products (64-group steps) take seconds a round: stop after a quarter second.
    let t0 = Instant::now();
    let mut best = 0f64;
    for _ in 0..ROUNDS {
        best = best.max(gemm_round(g, threads, operands)?);
        if t0.elapsed() > Duration::from_millis(250) {
            break;
        }
    }
    Ok(best)
}

/// How many copies of a product's operands a thread cycles through: one when they are to
/// stay cached, else enough to fill [`FROM_MEMORY_BYTES`] (at least two).
fn copies(g: Gemm, operands: Operands) -> usize {
    match operands {
        Operands::Cached => 1,
        Operands::FromMemory => {
            let bytes = 4 * g.batch * (g.m * g.k + g.k * g.n);
            FROM_MEMORY_BYTES.div_ceil(bytes.max(1)).max(2)
        }
    }
}

/// One timed round of [`gemm_gflops`].
fn gemm_round(g: Gemm, threads: usize, operands: Operands) -> Result<f64> {
    let threads = threads.max(1);
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let start = start.clone();
            std::thread::spawn(move || -> Result<(u32, Duration)> {
                let dev = Device::Cpu;
                let a = Tensor::randn(0f32, 1.0, (g.batch, g.m, g.k), &dev)?;
                let b = Tensor::randn(t as f32 * 1e-3, 1.0, (g.batch, g.k, g.n), &dev)?;
                // The copies side by side in one allocation each; a call reads one of them
                // through a view (no copy), in turn.
                let copies = copies(g, operands);
                let stack = |t: Tensor| -> Result<Tensor> {
                    let mut shape = vec![copies];
                    shape.extend_from_slice(t.dims());
                    Ok(t.unsqueeze(0)?.broadcast_as(shape)?.contiguous()?)
                };
                let (a, b) = (stack(a)?, stack(b)?);
                a.get(0)?.matmul(&b.get(0)?)?; // warm-up: page in the output
                start.wait();
                let t0 = Instant::now();
                let mut reps = 0u32;
                while reps < 3 || t0.elapsed() < Duration::from_millis(25) {
                    let i = reps as usize % copies;
                    std::hint::black_box(a.get(i)?.matmul(&b.get(i)?)?);
                    reps += 1;
                }
                Ok((reps, t0.elapsed()))
            })
        })
        .collect();
    let mut ops = 0.0;
    let mut secs: f64 = 0.0;
    for h in handles {
        let (reps, d) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a GEMM benchmark thread panicked"))??;
        ops += reps as f64 * g.flops();
        secs = secs.max(d.as_secs_f64());
    }
    Ok(ops / secs / 1e9)
}

/// One distinct product shape of a step: its share of the step's operations and its
/// measured speed.
#[derive(Debug, Clone, Copy)]
pub struct ShapeSpeed {
    pub gemm: Gemm,
    /// Operations of this shape in the set, over all of the set's.
    pub share: f64,
    /// Measured GFLOP/s ([`gemm_gflops`]).
    pub gflops: f64,
}

/// The peak of a set of products weighted by their operations: the speed at which the
/// whole set would run if every product ran at its own measured speed (total operations
/// over the sum of each product's time at that speed), with each shape's speed.
pub fn weighted_peak(
    gemms: &[Gemm],
    threads: usize,
    operands: Operands,
) -> Result<(f64, Vec<ShapeSpeed>)> {
    let mut by_shape: BTreeMap<Gemm, f64> = BTreeMap::new();
    for g in gemms {
        *by_shape.entry(*g).or_default() += g.flops();
    }
    let total: f64 = by_shape.values().sum();
    let (mut ops, mut secs) = (0.0, 0.0);
    let mut shapes = Vec::new();
    for (g, f) in &by_shape {
        let gflops = gemm_gflops(*g, threads, operands)?;
        ops += f;
        secs += f / (gflops * 1e9);
        shapes.push(ShapeSpeed {
            gemm: *g,
            share: f / total,
            gflops,
        });
    }
    Ok((ops / secs / 1e9, shapes))
}

/// The cores' arithmetic ceiling: fused multiply-adds from registers, with no memory
/// operand, on `threads` threads at once, in GFLOP/s (all threads), with the instruction
/// set used (the widest this CPU runs: AVX-512, else AVX2+FMA, else portable code). No
/// matrix kernel can pass it; the GEMM peak over it is how close the kernels come, and
/// the step over it how close the whole step comes. Best of three rounds of `round` each.
pub fn fma_peak(threads: usize, round: Duration) -> Result<(f64, &'static str)> {
    let threads = threads.max(1);
    let kind = fma::kind();
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    let t0 = Instant::now();
                    let mut ops = 0f64;
                    while t0.elapsed() < round {
                        ops += fma::burst(kind);
                    }
                    (ops, t0.elapsed())
                })
            })
            .collect();
        let (mut ops, mut secs) = (0f64, 0f64);
        for h in handles {
            let (o, d) = h
                .join()
                .map_err(|_| anyhow::anyhow!("an FMA benchmark thread panicked"))?;
            ops += o;
            secs = secs.max(d.as_secs_f64());
        }
        best = best.max(ops / secs / 1e9);
    }
    Ok((best, fma::name(kind)))
}

/// The FMA loops of [`fma_peak`], one per instruction set, chosen at run time.
mod fma {
    /// Independent accumulators per loop: enough to cover the FMA latency on two pipes.
    const ACC: usize = 12;
    /// Loop trips per burst.
    const TRIPS: u64 = 1 << 16;

    #[derive(Clone, Copy)]
    pub enum Kind {
        Avx512,
        Avx2,
        Portable,
    }

    pub fn kind() -> Kind {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kind::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kind::Avx2;
            }
        }
        Kind::Portable
    }

    pub fn name(k: Kind) -> &'static str {
        match k {
            Kind::Avx512 => "AVX-512",
            Kind::Avx2 => "AVX2+FMA",
            Kind::Portable => "portable",
        }
    }

    /// One burst of FMAs; returns the operations it did (a multiply-add is two).
    pub fn burst(k: Kind) -> f64 {
        let lanes = match k {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `kind` chose these only where the CPU reports the features.
            Kind::Avx512 => unsafe { std::hint::black_box(avx512()) },
            #[cfg(target_arch = "x86_64")]
            Kind::Avx2 => unsafe { std::hint::black_box(avx2()) },
            _ => std::hint::black_box(portable()),
        };
        2.0 * (ACC as u64 * TRIPS) as f64 * lanes
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn avx512() -> f64 {
        use std::arch::x86_64::*;
        let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut a = [_mm512_set1_ps(1.0); ACC];
        for _ in 0..TRIPS {
            for x in a.iter_mut() {
                *x = _mm512_fmadd_ps(*x, b, c);
            }
        }
        std::hint::black_box(a);
        16.0
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2() -> f64 {
        use std::arch::x86_64::*;
        let (b, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut a = [_mm256_set1_ps(1.0); ACC];
        for _ in 0..TRIPS {
            for x in a.iter_mut() {
                *x = _mm256_fmadd_ps(*x, b, c);
            }
        }
        std::hint::black_box(a);
        8.0
    }

    fn portable() -> f64 {
        let mut a = [1f32; ACC];
        for _ in 0..TRIPS {
            for x in a.iter_mut() {
                *x = *x * 0.999_999 + 1e-7;
            }
        }
        std::hint::black_box(a);
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A product big enough to be kernel-bound runs at a plausible speed: more than a
    /// naive loop could reach on one core, and finite.
    #[test]
    fn a_square_gemm_measures_a_finite_positive_speed() {
        let g = Gemm {
            batch: 1,
            m: 256,
            k: 256,
            n: 256,
        };
        for operands in [Operands::Cached, Operands::FromMemory] {
            let s = gemm_gflops(g, 1, operands).unwrap();
            assert!(s.is_finite() && s > 0.1, "{operands:?}: {s} GFLOP/s");
        }
        let (w, shapes) = weighted_peak(&[g, g], 1, Operands::Cached).unwrap();
        assert_eq!(shapes.len(), 1);
        assert_eq!(shapes[0].share, 1.0);
        assert!(w.is_finite() && w > 0.1, "{w}");
    }

    /// Operands from memory cycle through copies that together pass any last-level cache,
    /// however small or large the product; cached ones are a single pair.
    #[test]
    fn operands_from_memory_outgrow_the_caches() {
        for (m, k, n) in [
            (2, 2, 2),
            (448, 32, 158),
            (1792, 128, 128),
            (20000, 4096, 128),
        ] {
            let g = Gemm { batch: 1, m, k, n };
            assert_eq!(copies(g, Operands::Cached), 1);
            let c = copies(g, Operands::FromMemory);
            assert!(c >= 2, "{g:?}: {c} copies");
            assert!(
                c * 4 * (m * k + k * n) >= FROM_MEMORY_BYTES,
                "{g:?}: {c} copies"
            );
        }
    }

    /// The FMA ceiling is finite and positive, and names its instruction set.
    #[test]
    fn the_fma_ceiling_measures_a_finite_positive_speed() {
        let (f, kind) = fma_peak(1, Duration::from_millis(20)).unwrap();
        assert!(f.is_finite() && f > 0.01, "{f} GFLOP/s");
        assert!(["AVX-512", "AVX2+FMA", "portable"].contains(&kind));
    }
}
