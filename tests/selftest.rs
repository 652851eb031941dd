//! The self-test harness: the CPU passes against itself and every kernel is covered; a backend
//! with one broken kernel fails exactly that kernel's check; and `igpt selftest` through the
//! binary.

mod common;

use common::{igpt, s, stderr, tempdir};
use igpt::backend::cpu::CpuBackend;
use igpt::backend::{
    ArenaSizes, AttnShape, Backend, DType, Device, LogitGradient, Op, Precision, Update, View,
};
use igpt::sample::SampleOptions;
use igpt::selftest::{self, Check, Options, Tolerances};
use std::collections::BTreeSet;

/// Every check [`selftest::check_kernels`] must report: a kernel dropped from the harness, or
/// a variant of one, fails the test.
const KERNEL_CHECKS: &[&str] = &[
    "upload/download",
    "fill",
    "copy",
    "round_to_bf16",
    "fill (bf16)",
    "copy (bf16)",
    "embed_forward (shifted)",
    "embed_backward (shifted)",
    "embed_forward (direct)",
    "embed_backward (direct)",
    "rmsnorm_forward",
    "rmsnorm_forward (bf16 out)",
    "rmsnorm_backward",
    "rmsnorm_backward (bf16 copy)",
    "rmsnorm_backward (bf16 dout)",
    "matmul (N,N)",
    "matmul (N,N, accumulate)",
    "matmul (N,T)",
    "matmul (N,T, accumulate)",
    "matmul (T,N)",
    "matmul (T,N, accumulate)",
    "matmul (T,T)",
    "matmul (T,T, accumulate)",
    "matmul (bf16 operands, T,N, accumulate)",
    "matmul (bf16 operands, N,T)",
    "matmul (bf16 operands, N,T, bf16 out)",
    "pack_weight + matmul_packed (N, bf16 in and out)",
    "pack_weight + matmul_packed (N)",
    "pack_weight + matmul_packed (N, accumulate)",
    "pack_weight + matmul_packed (T)",
    "pack_weight + matmul_packed (T, accumulate)",
    "matmul_onto (N,N)",
    "pack_weight + matmul_packed_onto (N)",
    "attention_forward (causal)",
    "attention_backward (causal)",
    "attention_forward (causal, bf16 in and out)",
    "attention_backward (causal, bf16 in and out)",
    "attention_forward (bidirectional)",
    "attention_backward (bidirectional)",
    "attention_forward (bidirectional, bf16 in and out)",
    "attention_backward (bidirectional, bf16 in and out)",
    "attention_forward (causal, wide head)",
    "attention_backward (causal, wide head)",
    "attention_forward (causal, wide head, bf16 in and out)",
    "attention_backward (causal, wide head, bf16 in and out)",
    "attention_forward (bidirectional, wide head)",
    "attention_backward (bidirectional, wide head)",
    "attention_forward (bidirectional, wide head, bf16 in and out)",
    "attention_backward (bidirectional, wide head, bf16 in and out)",
    "attention_forward (causal, long)",
    "attention_backward (causal, long)",
    "attention_forward (causal, long, bf16 in and out)",
    "attention_backward (causal, long, bf16 in and out)",
    "attention_forward (bidirectional, long)",
    "attention_backward (bidirectional, long)",
    "attention_forward (bidirectional, long, bf16 in and out)",
    "attention_backward (bidirectional, long, bf16 in and out)",
    "embed_step",
    "attention_step (f32 cache)",
    "attention_step (f32 cache, bf16 out)",
    "attention_step (bf16 cache)",
    "attention_step (bf16 cache, bf16 out)",
    "draw_tokens",
    "gelu_forward",
    "gelu_forward (bf16 out)",
    "gelu_backward",
    "gelu_backward (bf16 out)",
    "gelu_backward (in place)",
    "gelu_forward (bf16 in and out)",
    "gelu_backward (bf16 in and out)",
    "cross_entropy",
    "cross_entropy (gradient)",
    "cross_entropy (weighted)",
    "cross_entropy (weighted, gradient)",
    "cross_entropy (gradient, bf16 out)",
    "cross_entropy (weighted, gradient, bf16 out)",
    "sum_squares",
    "clipped_update (clipped)",
    "clipped_update (within the clip)",
];

fn names(checks: &[Check]) -> BTreeSet<&str> {
    checks.iter().map(|c| c.name.as_str()).collect()
}

fn cpu_against(tested: &mut dyn Backend) -> Vec<Check> {
    let mut reference = CpuBackend::new();
    selftest::check_kernels(&mut reference, tested, Tolerances::default(), 11)
}

#[test]
fn the_cpu_passes_against_itself_and_every_kernel_is_checked() {
    let checks = cpu_against(&mut CpuBackend::new());
    assert_eq!(checks.len(), KERNEL_CHECKS.len(), "one check per name");
    assert_eq!(names(&checks), KERNEL_CHECKS.iter().copied().collect());
    for c in &checks {
        assert!(
            c.passed && !c.skipped && c.max_error <= c.tolerance,
            "{c:?}"
        );
    }
    // Every method of the trait that computes is named by some check.
    let all = checks
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    for kernel in [
        "embed_forward",
        "embed_backward",
        "rmsnorm_forward",
        "rmsnorm_backward",
        "matmul",
        "pack_weight",
        "matmul_packed",
        "matmul_onto",
        "matmul_packed_onto",
        "attention_forward",
        "attention_backward",
        "embed_step",
        "attention_step",
        "draw_tokens",
        "gelu_forward",
        "gelu_backward",
        "round_to_bf16",
        "cross_entropy",
        "sum_squares",
        "clipped_update",
        "fill",
        "copy",
        "upload",
        "download",
    ] {
        assert!(all.contains(kernel), "no check runs {kernel}");
    }
}

#[test]
fn tolerances_follow_the_precision_of_products() {
    let f32 = Tolerances::for_products(Precision::F32);
    assert_eq!(
        (f32.f32_elementwise, f32.f32_products, f32.products()),
        (1e-5, 1e-4, 1e-4)
    );
    let bf16 = Tolerances::for_products(Precision::Bf16);
    assert_eq!(
        (bf16.bf16_products, bf16.bf16_storage, bf16.products()),
        (2e-2, 1e-2, 2e-2)
    );
    assert_eq!(selftest::relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((selftest::relative_error(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
    assert!(selftest::relative_error(&[f32::NAN], &[1.0]).is_nan());
    assert!(selftest::relative_error(&[1.0], &[f32::NAN]).is_nan());
    let nan = Check::measured("x", f64::NAN, 1.0, String::new());
    assert!(!nan.passed && nan.result() == "FAIL");
}

/// Which kernel a [`Faulty`] backend gets wrong.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Every f32 output of gelu_forward 1e-3 too large.
    GeluOffset,
    /// rmsnorm_forward leaves the last row of its outputs unwritten.
    RmsnormLastRow,
    /// matmul overwrites its output when told to add to it.
    MatmulIgnoresAccumulate,
    /// attention_step with bf16 caches takes a single step one position early.
    Bf16StepEarly,
    /// draw_tokens keeps every colour where top-k should cut the palette.
    DrawsIgnoringTopK,
    /// Every output stored as bfloat16 one unit in the last place too large (a kernel that
    /// rounds wrongly).
    Bf16OutputsHigh,
    /// matmul_onto adds into its addend, then copies the sum out: the output is right, the
    /// residual stream the backward pass needs is not.
    OntoWritesAddend,
}

/// The CPU backend with one kernel broken.
struct Faulty {
    cpu: CpuBackend,
    fault: Fault,
}

impl Faulty {
    fn new(fault: Fault) -> Self {
        Self {
            cpu: CpuBackend::new(),
            fault,
        }
    }

    /// Under [`Fault::Bf16OutputsHigh`], moves a bf16 output one unit in the last place up.
    fn bf16_output(&mut self, out: View) {
        if let Fault::Bf16OutputsHigh = self.fault
            && out.dtype == DType::Bf16
        {
            let mut o = vec![0.0; out.len];
            self.cpu.download(out, &mut o);
            o.iter_mut()
                .for_each(|v| *v = f32::from_bits(v.to_bits() + 0x1_0000));
            self.cpu.upload(out, &o);
        }
    }
}

impl Backend for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn attention_scratch_len(&self, shape: AttnShape) -> usize {
        self.cpu.attention_scratch_len(shape)
    }
    fn decode_cache_len(&self, n_ctx: usize) -> usize {
        self.cpu.decode_cache_len(n_ctx)
    }
    fn native_bf16(&self) -> bool {
        self.cpu.native_bf16()
    }
    fn packed_len(&self, k: usize, n: usize) -> usize {
        self.cpu.packed_len(k, n)
    }
    fn attention_stores_bf16(&self, shape: AttnShape) -> bool {
        self.cpu.attention_stores_bf16(shape)
    }
    fn allocate(&mut self, sizes: ArenaSizes) -> anyhow::Result<()> {
        self.cpu.allocate(sizes)
    }
    fn upload(&mut self, dst: View, src: &[f32]) {
        self.cpu.upload(dst, src)
    }
    fn adopt_params(&mut self, params: Vec<f32>) -> anyhow::Result<()> {
        self.cpu.adopt_params(params)
    }
    fn release_params(&mut self, len: usize) -> Vec<f32> {
        self.cpu.release_params(len)
    }
    fn download(&self, src: View, dst: &mut [f32]) {
        self.cpu.download(src, dst)
    }
    fn fill(&mut self, dst: View, value: f32) {
        self.cpu.fill(dst, value)
    }
    fn copy(&mut self, dst: View, src: View) {
        self.cpu.copy(dst, src)
    }
    fn round_to_bf16(&mut self, dst: View, src: View) {
        self.cpu.round_to_bf16(dst, src);
        self.bf16_output(dst);
    }
    fn set_tokens(&mut self, tokens: &[u16]) {
        self.cpu.set_tokens(tokens)
    }
    fn set_draws(&mut self, options: &[SampleOptions], numbers: &[f32]) {
        if let Fault::DrawsIgnoringTopK = self.fault {
            let whole: Vec<SampleOptions> = options
                .iter()
                .map(|o| SampleOptions { top_k: 0, ..*o })
                .collect();
            return self.cpu.set_draws(&whole, numbers);
        }
        self.cpu.set_draws(options, numbers)
    }
    fn draw_tokens(&mut self, logits: View, v: usize, pos: usize) {
        self.cpu.draw_tokens(logits, v, pos)
    }
    fn drawn_tokens(&self, from: usize, to: usize, out: &mut [u16]) {
        self.cpu.drawn_tokens(from, to, out)
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
        self.cpu.embed_forward(out, wte, wpe, sos, t, d, direct)
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
        self.cpu
            .embed_backward(dwte, dwpe, dsos, dout, t, d, direct)
    }
    fn set_targets(&mut self, targets: &[u16], weights: &[f32]) {
        self.cpu.set_targets(targets, weights)
    }
    fn rmsnorm_forward(&mut self, out: View, rstd: View, x: View, g: View, d: usize) {
        if let Fault::RmsnormLastRow = self.fault {
            let short = |v: View, by: usize| View {
                len: v.len - by,
                ..v
            };
            self.cpu
                .rmsnorm_forward(short(out, d), short(rstd, 1), short(x, d), g, d);
            return;
        }
        self.cpu.rmsnorm_forward(out, rstd, x, g, d);
        self.bf16_output(out);
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
        self.cpu
            .rmsnorm_backward(dx, dx_rounded, dg, dout, x, rstd, g, d);
        if let Some(r) = dx_rounded {
            self.bf16_output(r);
        }
    }
    fn pack_weight(&mut self, dst: View, w: View, op: Op, k: usize, n: usize) {
        self.cpu.pack_weight(dst, w, op, k, n)
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
        self.cpu.matmul_packed(out, a, w, m, k, n, accumulate);
        self.bf16_output(out);
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
        let accumulate = accumulate && !matches!(self.fault, Fault::MatmulIgnoresAccumulate);
        self.cpu.matmul(out, a, ta, b, tb, m, k, n, accumulate);
        self.bf16_output(out);
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
        if let Fault::OntoWritesAddend = self.fault {
            self.cpu.matmul(addend, a, ta, b, tb, m, k, n, true);
            self.cpu.copy(out, addend);
        } else {
            // As the trait's default does, through this backend's own matmul.
            if out != addend {
                self.cpu.copy(out, addend);
            }
            self.matmul(out, a, ta, b, tb, m, k, n, true);
        }
    }
    fn attention_forward(
        &mut self,
        out: View,
        lse: View,
        qkv: View,
        scratch: View,
        shape: AttnShape,
    ) {
        self.cpu.attention_forward(out, lse, qkv, scratch, shape);
        self.bf16_output(out);
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
        self.cpu
            .attention_backward(dqkv, dout, out, lse, qkv, scratch, shape);
        self.bf16_output(dqkv);
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
        self.cpu.embed_step(out, wte, wpe, sos, pos, len, d)
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
        let pos = match self.fault {
            Fault::Bf16StepEarly if k_cache.dtype == DType::Bf16 && pos > 0 && len == 1 => pos - 1,
            _ => pos,
        };
        self.cpu
            .attention_step(out, k_cache, v_cache, qkv, scores, shape, pos, len);
        self.bf16_output(out);
    }
    fn gelu_forward(&mut self, out: View, x: View) {
        self.cpu.gelu_forward(out, x);
        if let Fault::GeluOffset = self.fault
            && out.dtype == DType::F32
        {
            let mut o = vec![0.0; out.len];
            self.cpu.download(out, &mut o);
            o.iter_mut().for_each(|v| *v += 1e-3);
            self.cpu.upload(out, &o);
        }
        self.bf16_output(out);
    }
    fn gelu_backward(&mut self, dx: View, dout: View, x: View) {
        self.cpu.gelu_backward(dx, dout, x);
        self.bf16_output(dx);
    }
    fn cross_entropy(
        &mut self,
        logits: View,
        losses: View,
        v: usize,
        gradient: Option<LogitGradient>,
    ) {
        self.cpu.cross_entropy(logits, losses, v, gradient);
        if let Some(g) = gradient.filter(|g| g.out != logits) {
            self.bf16_output(g.out);
        }
    }
    fn sum_squares(&self, x: View) -> f64 {
        self.cpu.sum_squares(x)
    }
    fn set_update(&mut self, update: Update) {
        self.cpu.set_update(update)
    }
    fn clipped_update(&mut self, tensors: &[(View, bool)], grads: View) {
        self.cpu.clipped_update(tensors, grads)
    }
    fn update_grad_norm(&self) -> f64 {
        self.cpu.update_grad_norm()
    }
}

/// A backend broken in `fault` fails exactly the checks `expected`, and passes the others.
fn fails_exactly(fault: Fault, expected: &[&str]) -> Vec<Check> {
    let checks = cpu_against(&mut Faulty::new(fault));
    assert_eq!(names(&checks), KERNEL_CHECKS.iter().copied().collect());
    let failed: BTreeSet<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        failed,
        expected.iter().copied().collect(),
        "{fault:?}: {checks:#?}"
    );
    checks
}

fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks.iter().find(|c| c.name == name).unwrap()
}

#[test]
fn a_gelu_off_by_a_little_fails_the_gelu_forward_checks_only() {
    // The bf16 output is checked against the same backend's f32 output, which is off.
    let checks = fails_exactly(
        Fault::GeluOffset,
        &[
            "gelu_forward",
            "gelu_forward (bf16 out)",
            "gelu_forward (bf16 in and out)",
        ],
    );
    let c = check(&checks, "gelu_forward");
    // Off by 1e-3 at outputs of a few units: about 1e-4 relative, ten times the tolerance.
    assert!(c.max_error > 1e-4 && c.max_error < 1e-3, "{c:?}");
    assert_eq!(c.result(), "FAIL");
}

#[test]
fn an_unwritten_row_of_rmsnorm_fails_the_rmsnorm_forward_checks_only() {
    let checks = fails_exactly(
        Fault::RmsnormLastRow,
        &["rmsnorm_forward", "rmsnorm_forward (bf16 out)"],
    );
    let c = check(&checks, "rmsnorm_forward");
    assert!(c.max_error.is_nan() && c.detail.contains("NaN"), "{c:?}");
}

#[test]
fn a_matmul_that_ignores_accumulate_fails_the_accumulating_checks() {
    fails_exactly(
        Fault::MatmulIgnoresAccumulate,
        &[
            "matmul (N,N, accumulate)",
            "matmul (N,T, accumulate)",
            "matmul (T,N, accumulate)",
            "matmul (T,T, accumulate)",
            "matmul (bf16 operands, T,N, accumulate)",
            "matmul_onto (N,N)",
        ],
    );
}

#[test]
fn a_product_onto_the_residual_stream_that_changes_it_fails_its_check_only() {
    let checks = fails_exactly(Fault::OntoWritesAddend, &["matmul_onto (N,N)"]);
    let c = check(&checks, "matmul_onto (N,N)");
    assert!(c.detail.contains("addend"), "{c:?}");
}

#[test]
fn a_draw_that_ignores_top_k_fails_draw_tokens_only() {
    let checks = fails_exactly(Fault::DrawsIgnoringTopK, &["draw_tokens"]);
    let c = check(&checks, "draw_tokens");
    assert!(
        c.max_error >= 1.0 && c.detail.contains("tokens differ"),
        "{c:?}"
    );
}

#[test]
fn bf16_outputs_rounded_wrongly_fail_the_bf16_output_checks_only() {
    let checks = fails_exactly(
        Fault::Bf16OutputsHigh,
        &[
            "rmsnorm_forward (bf16 out)",
            "gelu_forward (bf16 out)",
            "gelu_backward (bf16 out)",
            "rmsnorm_backward (bf16 copy)",
            "round_to_bf16",
            "attention_forward (causal, bf16 in and out)",
            "attention_backward (causal, bf16 in and out)",
            "attention_forward (bidirectional, bf16 in and out)",
            "attention_backward (bidirectional, bf16 in and out)",
            "attention_forward (causal, wide head, bf16 in and out)",
            "attention_backward (causal, wide head, bf16 in and out)",
            "attention_forward (bidirectional, wide head, bf16 in and out)",
            "attention_backward (bidirectional, wide head, bf16 in and out)",
            "attention_forward (causal, long, bf16 in and out)",
            "attention_backward (causal, long, bf16 in and out)",
            "attention_forward (bidirectional, long, bf16 in and out)",
            "attention_backward (bidirectional, long, bf16 in and out)",
            "attention_step (f32 cache, bf16 out)",
            "attention_step (bf16 cache, bf16 out)",
            "matmul (bf16 operands, N,T, bf16 out)",
            "pack_weight + matmul_packed (N, bf16 in and out)",
            "cross_entropy (gradient, bf16 out)",
            "cross_entropy (weighted, gradient, bf16 out)",
            "gelu_forward (bf16 in and out)",
            "gelu_backward (bf16 in and out)",
        ],
    );
    let c = check(&checks, "gelu_forward (bf16 out)");
    assert!(c.max_error >= 1.0, "{c:?}");
}

#[test]
fn a_decoding_step_at_the_wrong_position_fails_its_cache_check_only() {
    fails_exactly(Fault::Bf16StepEarly, &["attention_step (bf16 cache)"]);
}

#[test]
fn the_cpu_report_passes_and_skips_bf16_training() {
    let report = selftest::run(
        &Device::Cpu,
        &Options {
            seed: 3,
            bf16_steps: Some(200),
        },
    )
    .unwrap();
    assert!(report.passed(), "{}", report.table());
    assert!(report.failures().is_empty());
    let set = names(&report.checks);
    for name in KERNEL_CHECKS {
        assert!(set.contains(name), "the report lacks {name}");
    }
    for name in [
        "training step: loss",
        "training step: parameters",
        "training step: gradients",
        "decoder (f32)",
        "decoder (f32, after a prefill)",
        "decoder (bf16)",
        "decoder (bf16, after a prefill)",
    ] {
        let c = check(&report.checks, name);
        assert!(c.passed && !c.skipped, "{c:?}");
    }
    let bf16 = check(&report.checks, selftest::BF16_TRAINING);
    assert!(bf16.skipped && bf16.detail.contains("the CPU trains in f32 only"));
    let replay = check(&report.checks, selftest::DECODER_REPLAY);
    assert!(
        replay.skipped && replay.detail.contains("does not record"),
        "{replay:?}"
    );
    let table = report.table();
    assert!(table.contains("kernel") && table.contains("max error") && table.contains("skipped"));
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(
        json["checks"].as_array().unwrap().len(),
        report.checks.len()
    );
    assert_eq!(json["device"], "cpu");

    // The bf16 check on its own says the same, without touching the data.
    let empty = igpt::data::TokenSet::from_tokens(Vec::new(), 784, 16, None).unwrap();
    let c = selftest::check_bf16_training(&Device::Cpu, &empty, 200).unwrap();
    assert!(c.skipped && c.passed && c.result() == "skipped");
}

#[test]
fn a_failed_check_fails_the_report_and_shows_in_the_table() {
    let report = selftest::Report {
        device: "cpu".into(),
        reference: "cpu".into(),
        checks: vec![
            Check::measured("good", 1e-6, 1e-5, String::new()),
            Check::measured("bad", 1e-3, 1e-5, "worst output: out".into()),
            Check::skipped("later", "not asked for"),
        ],
    };
    assert!(!report.passed());
    assert_eq!(report.failures().len(), 1);
    let table = report.table();
    assert!(
        table.contains("FAIL") && table.contains("1 of 3 checks FAILED"),
        "{table}"
    );
}

#[test]
fn the_command_prints_the_table_and_fails_without_a_gpu() {
    let dir = tempdir("selftest");
    let json = dir.join("report.json");
    let out = igpt(&["selftest", "--device", "cpu", "--quick", "--json", s(&json)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, stderr(&out));
    assert!(
        stdout.contains("max error") && stdout.contains("gelu_forward") && stdout.contains("pass"),
        "{stdout}"
    );
    assert!(stdout.contains("checks passed"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["checks"].as_array().unwrap().len() > KERNEL_CHECKS.len());

    // Without a GPU, cuda fails with the reason, not a panic.
    if Device::available().len() == 1 {
        let out = igpt(&["selftest", "--device", "cuda", "--quick"]);
        let err = stderr(&out);
        assert!(!out.status.success());
        assert!(err.contains("no CUDA driver"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
