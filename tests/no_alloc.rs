//! A training, fine-tuning or decoding step in the steady state allocates nothing on the heap:
//! every activation, gradient, cache and optimizer buffer was planned when the engine or
//! decoder was built.
//!
//! The `gemm` crate allocates small packing buffers inside each product call; those are
//! counted separately (they are freed before the call returns) and only their size is bounded.

use igpt::backend::cpu::matmul::inside_gemm;
use igpt::backend::{Device, Precision};
use igpt::config::ModelConfig;
use igpt::data::TokenSet;
use igpt::train::{TrainConfig, Trainer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static ENGINE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static GEMM_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static GEMM_MAX_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            if inside_gemm() {
                GEMM_ALLOCS.fetch_add(1, Ordering::Relaxed);
                GEMM_MAX_BYTES.fetch_max(layout.size(), Ordering::Relaxed);
            } else {
                ENGINE_ALLOCS.fetch_add(1, Ordering::Relaxed);
            }
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) && !inside_gemm() {
            ENGINE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn training_finetuning_and_decoding_steps_do_not_allocate() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global()
        .ok();
    // Training runs on the pool (as `igpt train` does): a call from outside the pool would
    // hand each parallel kernel to rayon's global queue, whose blocks are allocated as it grows.
    rayon::scope(|_| run_steps());
}

fn run_steps() {
    let model = ModelConfig {
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_vocab: 32,
        side: 12,
        channels: 1,
        objective: Default::default(),
    };
    let t = model.n_ctx();
    let tokens: Vec<u16> = (0..20 * t)
        .map(|i| ((i * 31 + i / 7) % 32) as u16)
        .collect();
    let data = TokenSet::from_tokens(tokens, t, 32, None).unwrap();
    // Two micro-batches per step, so accumulation is covered too.
    let cfg = TrainConfig {
        batch: 4,
        micro_batch: 2,
        warmup: 2,
        steps: 100,
        ..TrainConfig::default()
    };
    let params = igpt::model::init_params(&model, 1);
    let mut trainer = Trainer::new(&model, cfg, &params, &Device::Cpu).unwrap();
    // Warm-up: thread pool, thread-locals and the epoch order come into being here.
    for _ in 0..2 {
        trainer.step(&data).unwrap();
    }
    ARMED.store(true, Ordering::SeqCst);
    // Eight steps of four images cross an epoch boundary (20 images), so reshuffling is covered.
    for _ in 0..8 {
        trainer.step(&data).unwrap();
    }
    ARMED.store(false, Ordering::SeqCst);
    let engine = ENGINE_ALLOCS.load(Ordering::SeqCst);
    let gemm = GEMM_ALLOCS.load(Ordering::SeqCst);
    let gemm_max = GEMM_MAX_BYTES.load(Ordering::SeqCst);
    eprintln!(
        "allocations in 8 steps: engine {engine}, inside gemm {gemm} (largest {gemm_max} bytes)"
    );
    assert_eq!(engine, 0, "the engine allocated during training steps");

    // Fine-tuning steps (model and classification head together) allocate nothing either,
    // here a batch of four in two passes of two.
    let mut engine = igpt::model::Engine::new(&model, 2, true, &Device::Cpu).unwrap();
    engine.set_params(&params).unwrap();
    let head = igpt::finetune::Head::new(model.n_embd, 3, vec![]);
    let mut ft = igpt::finetune::Finetuner::new(engine, head, 0);
    let mut batch = vec![0u16; 4 * t];
    for (i, img) in batch.chunks_exact_mut(t).enumerate() {
        data.copy_image(i, img);
    }
    let labels = [0u32, 2, 1, 2];
    for _ in 0..2 {
        ft.step(&batch, &labels, 1e-3, 1e-2, true).unwrap();
    }
    ENGINE_ALLOCS.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        ft.step(&batch, &labels, 1e-3, 1e-2, true).unwrap();
    }
    ARMED.store(false, Ordering::SeqCst);
    let finetune = ENGINE_ALLOCS.load(Ordering::SeqCst);
    assert_eq!(finetune, 0, "fine-tuning steps allocated {finetune} times");
    // Decoding steps (the KV-cache decoder, batch 3, f32 and bf16) allocate nothing either,
    // with the logits returned or the tokens drawn on the backend.
    for precision in [Precision::F32, Precision::Bf16] {
        let mut dec = igpt::model::Decoder::with_precision(
            &model,
            3,
            &Device::Cpu,
            params.clone(),
            precision,
        )
        .unwrap();
        let prev = [1u16, 5, 9];
        dec.prefill(&[1, 2, 1, 2, 3, 4], 2).unwrap();
        ENGINE_ALLOCS.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        for _ in 2..t {
            dec.step(&prev).unwrap();
        }
        ARMED.store(false, Ordering::SeqCst);
        let decoding = ENGINE_ALLOCS.load(Ordering::SeqCst);
        assert_eq!(
            decoding, 0,
            "{precision} decoding steps allocated {decoding} times"
        );
        // Steps that draw their tokens on the backend, and fetching them, allocate nothing
        // either (the first step, which sizes each thread's draw scratch, is not counted).
        let opts = vec![
            igpt::sample::SampleOptions {
                top_k: 3,
                top_p: 0.9,
                ..Default::default()
            };
            3
        ];
        dec.prefill(&[1, 2, 1, 2, 3, 4], 2).unwrap();
        dec.set_draws(&opts, &vec![0.4; 3 * t]).unwrap();
        dec.step_drawing(Some(&prev)).unwrap();
        ENGINE_ALLOCS.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        for _ in 3..t {
            dec.step_drawing(None).unwrap();
        }
        let fetched = dec.drawn(2, t).unwrap().len();
        ARMED.store(false, Ordering::SeqCst);
        let drawing = ENGINE_ALLOCS.load(Ordering::SeqCst);
        assert_eq!(fetched, 3 * (t - 2));
        assert_eq!(
            drawing, 0,
            "{precision} drawing steps allocated {drawing} times"
        );
    }
    // gemm's packing scratch is bounded by cache-sized blocks, never by the tensor sizes.
    assert!(
        gemm_max <= 4 << 20,
        "gemm allocated {gemm_max} bytes at once"
    );
}
