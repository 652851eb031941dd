// One sequence of the longest context iGPT uses (64x64 = 4,096 positions), causal, through the
// flash kernels as mod.rs launches them (heads of 64 and of 96, iGPT-L's), f32 and bf16,
// against check.cpp's float64 reference. Run by tests/cuda_kernels_on_host.rs (about 80 s on two
// cores), or by hand:
//
//   g++ -std=c++17 -O2 -pthread -fno-extern-tls-init tests/cuda_host/long_context.cpp -o long
//   ./long
#define main check_main
#include "check.cpp"
#undef main
int main() {
    for (int hd : {64, 96}) {
        int batch = 1, nh = 1, t = 4096, d = nh * hd, causal = 1;
        size_t rows = t, stats = t;
        vector<float> qkv = random(rows * 3 * d, 0.05f, 1.5f), dout = random(rows * d);
        FlashRef ref = flash_reference(qkv, dout, batch, t, nh, hd, causal);
        FlashKernels k =
            hd <= 64 ? FlashKernels{64, flash_attention_forward_64, flash_attention_backward_kv_64,
                                    flash_attention_backward_q_64, flash_attention_forward_64_bf16,
                                    flash_attention_backward_kv_64_bf16,
                                    flash_attention_backward_q_64_bf16}
                     : FlashKernels{128, flash_attention_forward_128,
                                    flash_attention_backward_kv_128, flash_attention_backward_q_128,
                                    flash_attention_forward_128_bf16,
                                    flash_attention_backward_kv_128_bf16,
                                    flash_attention_backward_q_128_bf16};
        vector<float> out = nan_f32(rows * d), lse = nan_f32(stats), delta = nan_f32(stats);
        dim3 grid = flash_grid(t, nh, batch);
        launch(k.forward, grid, kFlashBlock, k.shared(true), out.data(), lse.data(),
               (const float*)qkv.data(), t, nh, hd, causal);
        launch(flash_attention_backward_prepare, dim3((unsigned)rows), dim3(128), 0, delta.data(),
               (const float*)dout.data(), (const float*)out.data(), t, nh, hd);
        vector<float> dqkv = flash_backward(k, dout, qkv, lse, delta, batch, t, nh, hd, causal);
        std::string what = "t 4096 hd " + std::to_string(hd) + " causal";
        check_scaled(k.name("flash_attention_forward_"), what + " out", out, ref.out, kFlash);
        check_flash_gradients(k, dqkv, ref, rows, d, what, kFlash);

        // As training runs them: bf16 Q, K, V and dout (their tiles copied asynchronously, two
        // stages but for the forward kernel of width 128), bf16 output and gradients.
        vector<uint16_t> qkv16 = rounded(qkv), dout16 = rounded(dout), out16(rows * d, kPoisonBf16),
                         dqkv16(rows * 3 * d, kPoisonBf16);
        vector<float> lse16 = nan_f32(stats), delta16 = nan_f32(stats);
        launch(k.forward_bf16, grid, kFlashBlock, k.shared(true, true), out16.data(),
               lse16.data(), (const uint16_t*)qkv16.data(), t, nh, hd, causal);
        launch(flash_attention_backward_prepare_bf16, dim3((unsigned)rows), dim3(128), 0,
               delta16.data(), (const uint16_t*)dout16.data(), (const uint16_t*)out16.data(), t,
               nh, hd);
        for (FlashGradient16 g : {k.kv_bf16, k.q_bf16})
            launch(g, grid, kFlashBlock, k.shared(false, true), dqkv16.data(),
                   (const uint16_t*)dout16.data(), (const uint16_t*)qkv16.data(),
                   (const float*)lse16.data(), (const float*)delta16.data(), t, nh, hd, causal);
        check_scaled(k.name("flash_attention_forward_") + "_bf16", what + " bf16 out",
                     widened(out16), ref.out, kFlash);
        check_flash_gradients(k, widened(dqkv16), ref, rows, d, what + " bf16", kFlash, "_bf16");
    }
    bool all = true;
    for (auto& name : order) {
        Outcome& o = outcomes[name];
        printf("%-34s %10.3e %9.0e  %s %s\n", name.c_str(), o.worst, o.tol, o.pass ? "PASS" : "FAIL", o.note.c_str());
        all = all && o.pass;
    }
    return all ? 0 : 1;
}
