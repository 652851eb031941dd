use std::time::Instant;
fn main() {
    for mb in [1usize, 8, 24, 64, 256] {
        let n = mb * 1_000_000 / 4;
        let a = vec![1.0f32; n];
        let b = vec![0.5f32; n];
        let reps = (512 / mb).max(2);
        let mut s = 0.0;
        let t0 = Instant::now();
        for _ in 0..reps {
            s += igpt::backend::cpu::simd::dot(&a, &b);
        }
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "{mb:>4} MB x2: {:.1} GB/s ({s})",
            (2 * n * 4 * reps) as f64 / dt / 1e9
        );
    }
}
