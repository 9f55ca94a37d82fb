// y[M, N] = x[M, K] @ w[N, K]^T (+ b) for a few rows M, with w in bfloat16 and x, y in float32,
// for x86 CPUs with AVX2 + FMA but no native bfloat16 (no AVX512-BF16 / AMX).
//
// Why: there torch multiplies a bf16 weight by M rows about M times as slowly as by one row, so a
// pass over k+1 draft tokens costs ~k+1 one-token passes and speculative decoding cannot pay. Here
// each weight row is loaded once, widened to float32 in registers (a bf16 is the top half of a
// float32, so the widening is exact), and used for every one of the M rows: the pass costs about
// one weight read plus M dot products.
//
// Every output element is one 8-lane float32 accumulator over k in ascending steps of 8, reduced
// the same way, whatever M: a row's result does not depend on how many rows share the call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

inline __m256 load_bf16x8(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NB weight rows at a time (independent FMA chains hide latency); M rows of x; M * NB <= 8 accumulators.
template <int M, int NB>
void rows_block(const float* x, const uint16_t* w, const float* bias, float* y, int64_t K, int64_t N,
                int64_t n) {
  __m256 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_bf16x8(w + (n + j) * K + k);
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * bf16_to_float(w[(n + j) * K + k]);
      y[m * N + n + j] = bias ? s + bias[n + j] : s;
    }
}

template <int M>
void rows_range(const float* x, const uint16_t* w, const float* bias, float* y, int64_t K, int64_t N,
                int64_t n0, int64_t n1) {
  constexpr int NB = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) rows_block<M, NB>(x, w, bias, y, K, N, n);
  for (; n < n1; ++n) rows_block<M, 1>(x, w, bias, y, K, N, n);
}

using RangeFn = void (*)(const float*, const uint16_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr RangeFn kRange[] = {nullptr, rows_range<1>, rows_range<2>, rows_range<3>, rows_range<4>,
                              rows_range<5>, rows_range<6>, rows_range<7>, rows_range<8>};

}  // namespace

// x [M, K] float32, w [N, K] bfloat16, bias [N] float32 or empty -> y [M, N] float32.
torch::Tensor bf16_rows_linear(torch::Tensor x, torch::Tensor w, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous bf16 [N, K]");
  TORCH_CHECK(x.size(1) == w.size(1), "x and w disagree on K");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat32 && bias.numel() == N && bias.is_contiguous()),
              "bias: contiguous float32 [N]");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Rows in chunks of at most 8 (the accumulators must stay in the 16 ymm registers).
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m0);
    RangeFn fn = kRange[rows];
    const float* xr = xp + m0 * K;
    float* yr = yp + m0 * N;
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { fn(xr, wp, bp, yr, K, N, n0, n1); });
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_rows_linear", &bf16_rows_linear, "x[M,K] f32 @ w[N,K] bf16 ^T (+ b) -> f32 [M,N], AVX2");
}
