// One sequence of the longest context iGPT uses (64x64 = 4,096 positions), causal, through the
// flash kernels as mod.rs launches them (heads of 64 and of 96, iGPT-L's), against check.cpp's
// float64 reference. Run by tests/cuda_kernels_on_host.rs (about 40 s on two cores), or by hand:
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
        FlashKernels k = hd <= 64 ? FlashKernels{64, flash_attention_forward_64, flash_attention_backward_kv_64, flash_attention_backward_q_64}
                                  : FlashKernels{128, flash_attention_forward_128, flash_attention_backward_kv_128, flash_attention_backward_q_128};
        vector<float> out = nan_f32(rows * d), lse = nan_f32(stats), delta = nan_f32(stats);
        launch(k.forward, flash_grid(t, nh, batch), kFlashBlock, k.shared(),
               out.data(), lse.data(), (const float*)qkv.data(), t, nh, hd, causal);
        launch(flash_attention_backward_prepare, dim3((unsigned)rows), dim3(128), 0, delta.data(),
               (const float*)dout.data(), (const float*)out.data(), t, nh, hd);
        vector<float> dqkv = flash_backward(k, dout, qkv, lse, delta, batch, t, nh, hd, causal);
        std::string what = "t 4096 hd " + std::to_string(hd) + " causal";
        check_scaled(k.name("flash_attention_forward_"), what + " out", out, ref.out, kFlash);
        check_flash_gradients(k, dqkv, ref, rows, d, what, kFlash);
    }
    bool all = true;
    for (auto& name : order) {
        Outcome& o = outcomes[name];
        printf("%-34s %10.3e %9.0e  %s %s\n", name.c_str(), o.worst, o.tol, o.pass ? "PASS" : "FAIL", o.note.c_str());
        all = all && o.pass;
    }
    return all ? 0 : 1;
}
