//! Where a step's time goes, kernel by kernel: while a [`Profile`] is alive, every backend
//! [`Device::open`](super::Device::open) creates on the same thread is wrapped so that each kernel call waits for
//! the device to finish (a GPU runs asynchronously) and adds its time to the profile's table.
//!
//! Waiting after every call removes the overlap of host and device work, so a profiled step is
//! slower than a real one; the shares, not the sum, are what it measures.

use super::{ArenaSizes, AttnShape, Backend, LogitGradient, Op, Update, View};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Calls and seconds per kernel name.
type Table = BTreeMap<&'static str, (u64, f64)>;

thread_local! {
    /// The table backends opened on this thread report to, while a profile is alive. Per
    /// thread, so that a profile sees only the work it started.
    static ACTIVE: std::cell::RefCell<Option<Arc<Mutex<Table>>>> =
        const { std::cell::RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves only timings behind: still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One kernel's share of the profiled calls.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KernelTime {
    pub kernel: &'static str,
    pub calls: u64,
    pub seconds: f64,
}

/// Profiling on, for backends opened on this thread until this is dropped.
pub struct Profile {
    table: Arc<Mutex<Table>>,
}

impl Profile {
    /// Starts profiling (replacing any profile already running).
    pub fn start() -> Profile {
        let table = Arc::new(Mutex::new(Table::new()));
        ACTIVE.with(|a| *a.borrow_mut() = Some(table.clone()));
        Profile { table }
    }

    /// Forgets what was recorded so far (a warm-up's calls, say).
    pub fn reset(&self) {
        lock(&self.table).clear();
    }

    /// Every kernel called, most time first.
    pub fn kernels(&self) -> Vec<KernelTime> {
        let mut rows: Vec<KernelTime> = lock(&self.table)
            .iter()
            .map(|(&kernel, &(calls, seconds))| KernelTime {
                kernel,
                calls,
                seconds,
            })
            .collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        ACTIVE.with(|a| {
            let mut active = a.borrow_mut();
            if active.as_ref().is_some_and(|t| Arc::ptr_eq(t, &self.table)) {
                *active = None;
            }
        });
    }
}

/// `backend`, timed kernel by kernel when a profile is running.
pub(crate) fn wrap(backend: Box<dyn Backend>) -> Box<dyn Backend> {
    match ACTIVE.with(|a| a.borrow().clone()) {
        Some(table) => Box::new(Profiled {
            inner: backend,
            table,
        }),
        None => backend,
    }
}

struct Profiled {
    inner: Box<dyn Backend>,
    table: Arc<Mutex<Table>>,
}

impl Profiled {
    fn record(&self, kernel: &'static str, start: Instant) {
        self.inner.synchronize();
        let seconds = start.elapsed().as_secs_f64();
        let mut table = lock(&self.table);
        let row = table.entry(kernel).or_insert((0, 0.0));
        row.0 += 1;
        row.1 += seconds;
    }
}

/// Forwards a kernel call and records its time under its name.
macro_rules! timed {
    ($self:ident, $name:ident ( $($arg:expr),* )) => {{
        let start = Instant::now();
        let out = $self.inner.$name($($arg),*);
        $self.record(stringify!($name), start);
        out
    }};
}

impl Backend for Profiled {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn attention_scratch_len(&self, shape: AttnShape) -> usize {
        self.inner.attention_scratch_len(shape)
    }
    fn decode_cache_len(&self, n_ctx: usize) -> usize {
        self.inner.decode_cache_len(n_ctx)
    }
    fn decode_context_limit(&self, head_dim: usize) -> usize {
        self.inner.decode_context_limit(head_dim)
    }
    fn native_bf16(&self) -> bool {
        self.inner.native_bf16()
    }
    fn rounds_packed_inputs(&self) -> bool {
        self.inner.rounds_packed_inputs()
    }
    fn attention_stores_bf16(&self, shape: AttnShape) -> bool {
        self.inner.attention_stores_bf16(shape)
    }
    fn packed_len(&self, k: usize, n: usize) -> usize {
        self.inner.packed_len(k, n)
    }
    fn device_memory_free(&self) -> Option<u128> {
        self.inner.device_memory_free()
    }
    fn synchronize(&self) {
        self.inner.synchronize()
    }
    fn allocate(&mut self, sizes: ArenaSizes) -> anyhow::Result<()> {
        self.inner.allocate(sizes)
    }
    fn adopt_params(&mut self, params: Vec<f32>) -> anyhow::Result<()> {
        timed!(self, adopt_params(params))
    }
    fn release_params(&mut self, len: usize) -> Vec<f32> {
        timed!(self, release_params(len))
    }
    fn upload(&mut self, dst: View, src: &[f32]) {
        timed!(self, upload(dst, src))
    }
    fn download(&self, src: View, dst: &mut [f32]) {
        timed!(self, download(src, dst))
    }
    fn fill(&mut self, dst: View, value: f32) {
        timed!(self, fill(dst, value))
    }
    fn copy(&mut self, dst: View, src: View) {
        timed!(self, copy(dst, src))
    }
    fn round_to_bf16(&mut self, dst: View, src: View) {
        timed!(self, round_to_bf16(dst, src))
    }
    fn set_tokens(&mut self, tokens: &[u16]) {
        timed!(self, set_tokens(tokens))
    }
    fn set_draws(&mut self, options: &[crate::sample::SampleOptions], numbers: &[f32]) {
        timed!(self, set_draws(options, numbers))
    }
    fn draw_tokens(&mut self, logits: View, v: usize, pos: usize) {
        timed!(self, draw_tokens(logits, v, pos))
    }
    fn drawn_tokens(&self, from: usize, to: usize, out: &mut [u16]) {
        timed!(self, drawn_tokens(from, to, out))
    }
    fn embed_forward(
        &mut self,
        out: View,
        wte: View,
        wpe: View,
        sos: View,
        t: usize,
        d: usize,
        direct: bool,
    ) {
        timed!(self, embed_forward(out, wte, wpe, sos, t, d, direct))
    }
    fn embed_backward(
        &mut self,
        dwte: View,
        dwpe: View,
        dsos: View,
        dout: View,
        t: usize,
        d: usize,
        direct: bool,
    ) {
        timed!(self, embed_backward(dwte, dwpe, dsos, dout, t, d, direct))
    }
    fn set_targets(&mut self, targets: &[u16], weights: &[f32]) {
        timed!(self, set_targets(targets, weights))
    }
    fn rmsnorm_forward(&mut self, out: View, rstd: View, x: View, g: View, d: usize) {
        timed!(self, rmsnorm_forward(out, rstd, x, g, d))
    }
    fn rmsnorm_backward(
        &mut self,
        dx: View,
        dx_rounded: Option<View>,
        dg: View,
        dout: View,
        x: View,
        rstd: View,
        g: View,
        d: usize,
    ) {
        timed!(
            self,
            rmsnorm_backward(dx, dx_rounded, dg, dout, x, rstd, g, d)
        )
    }
    fn pack_weight(&mut self, dst: View, w: View, op: Op, k: usize, n: usize) {
        timed!(self, pack_weight(dst, w, op, k, n))
    }
    fn matmul_packed(
        &mut self,
        out: View,
        a: View,
        w: View,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        timed!(self, matmul_packed(out, a, w, m, k, n, accumulate))
    }
    fn matmul(
        &mut self,
        out: View,
        a: View,
        ta: Op,
        b: View,
        tb: Op,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        timed!(self, matmul(out, a, ta, b, tb, m, k, n, accumulate))
    }
    fn matmul_packed_onto(
        &mut self,
        out: View,
        addend: View,
        a: View,
        w: View,
        m: usize,
        k: usize,
        n: usize,
    ) {
        timed!(self, matmul_packed_onto(out, addend, a, w, m, k, n))
    }
    fn matmul_onto(
        &mut self,
        out: View,
        addend: View,
        a: View,
        ta: Op,
        b: View,
        tb: Op,
        m: usize,
        k: usize,
        n: usize,
    ) {
        timed!(self, matmul_onto(out, addend, a, ta, b, tb, m, k, n))
    }
    fn attention_forward(
        &mut self,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        shape: AttnShape,
    ) {
        timed!(self, attention_forward(out, lse, qkv, scratch, shape))
    }
    fn attention_backward(
        &mut self,
        dqkv: View,
        dout: View,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        shape: AttnShape,
    ) {
        timed!(
            self,
            attention_backward(dqkv, dout, out, lse, qkv, scratch, shape)
        )
    }
    fn embed_step(
        &mut self,
        out: View,
        wte: View,
        wpe: View,
        sos: View,
        pos: usize,
        len: usize,
        d: usize,
    ) {
        timed!(self, embed_step(out, wte, wpe, sos, pos, len, d))
    }
    fn attention_step(
        &mut self,
        out: View,
        k_cache: View,
        v_cache: View,
        qkv: View,
        scores: View,
        shape: AttnShape,
        pos: usize,
        len: usize,
    ) {
        timed!(
            self,
            attention_step(out, k_cache, v_cache, qkv, scores, shape, pos, len)
        )
    }
    fn gelu_forward(&mut self, out: View, x: View) {
        timed!(self, gelu_forward(out, x))
    }
    fn gelu_backward(&mut self, dx: View, dout: View, x: View) {
        timed!(self, gelu_backward(dx, dout, x))
    }
    fn cross_entropy(
        &mut self,
        logits: View,
        losses: View,
        v: usize,
        gradient: Option<LogitGradient>,
    ) {
        timed!(self, cross_entropy(logits, losses, v, gradient))
    }
    fn sum_squares(&self, x: View) -> f64 {
        timed!(self, sum_squares(x))
    }
    fn set_update(&mut self, update: Update) {
        timed!(self, set_update(update))
    }
    fn clipped_update(&mut self, tensors: &[(View, bool)], grads: View) {
        timed!(self, clipped_update(tensors, grads))
    }
    fn update_grad_norm(&self) -> f64 {
        timed!(self, update_grad_norm())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Arena, Device};

    #[test]
    fn backends_opened_while_profiling_report_each_call() {
        let before = Device::Cpu.open().unwrap();
        let profile = Profile::start();
        let mut b = Device::Cpu.open().unwrap();
        b.allocate(ArenaSizes {
            params: 64,
            acts: 64,
            ..Default::default()
        })
        .unwrap();
        let x = View::new(Arena::Acts, 0, 32);
        let y = View::new(Arena::Acts, 32, 32);
        b.fill(x, 1.5);
        b.fill(x, 2.0);
        b.gelu_forward(y, x);
        let mut out = vec![0.0; 32];
        b.download(y, &mut out);
        // The wrapper changes nothing but the clock.
        let gelu2 = 2.0 / (1.0 + (-1.702f32 * 2.0).exp());
        assert!(out.iter().all(|&v| (v - gelu2).abs() < 1e-6), "{out:?}");
        let rows = profile.kernels();
        let calls = |k: &str| rows.iter().find(|r| r.kernel == k).map(|r| r.calls);
        assert_eq!(calls("fill"), Some(2));
        assert_eq!(calls("gelu_forward"), Some(1));
        assert_eq!(calls("download"), Some(1));
        assert!(rows.windows(2).all(|w| w[0].seconds >= w[1].seconds));
        profile.reset();
        assert!(profile.kernels().is_empty());
        // A backend opened before, or after the profile ends, is not timed.
        drop(before);
        drop(profile);
        let mut after = Device::Cpu.open().unwrap();
        after
            .allocate(ArenaSizes {
                acts: 8,
                ..Default::default()
            })
            .unwrap();
        after.fill(View::new(Arena::Acts, 0, 8), 1.0);
        assert!(ACTIVE.with(|a| a.borrow().is_none()));
    }
}
