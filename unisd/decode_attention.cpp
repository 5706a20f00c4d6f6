// One decode step's attention for the fast backend (unisd/decode_attention.py), bf16 or fp32.
//
// For slot b < n and KV head h, with G = H / KV query rows q_g sharing that head and the
// slot's first len_b cached positions:
//   s_g,l = scale · q_g · k_l,   p_g = softmax(s_g),   out_g = sum_l p_g,l · v_l
// in fp32, the result rounded to the inputs' dtype. One pass over each slot's keys and one
// over its values, each read once for all G rows; work split over (slot, head) pairs.
//
// Two implementations of the same sums. For bf16 where the CPU has AVX512-BF16 and the head
// size is 64 or 128 with G ≤ 8 (the shapes of the models we ship), `attend_avx512`: each
// score is a bf16 dot product of q_g and k_l by vdpbf16ps (exact products, fp32 sums),
// sixteen keys' partial sums reduced together, and the values accumulated in fp32
// registers. Elsewhere, and for fp32, `attend_loops`: plain loops the compiler vectorises.
// Both are built with -O3 -march=native -ffast-math (the fp32 sums reassociate, as in any
// SIMD reduction; every value is finite).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define UNISD_AVX512_BF16 1
#endif

namespace {

template <typename T>  // uint16_t (bf16 bits) or float
struct Problem {      // one call's operands; problem i = b·KV + h is slot b's head h
  const T *q, *k, *v;
  T* out;
  const int64_t* lens;
  int64_t KV, G, D, L;
  float scale;
};

inline float load(uint16_t x) {  // bf16 bits → fp32
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's cast
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

inline float load(float x) { return x; }  // load/store of the loops' element type (fp32: as is)
inline void store(uint16_t* out, float f) { *out = to_bf16(f); }
inline void store(float* out, float f) { *out = f; }

// s[0..len) ← softmax(s[0..len)), in place.
inline void softmax(float* s, int64_t len) {
  const float m = *std::max_element(s, s + len);
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t l = 0; l < len; ++l) z += (s[l] = std::exp(s[l] - m));
  const float inv = 1.f / z;
#pragma omp simd
  for (int64_t l = 0; l < len; ++l) s[l] *= inv;
}

// Problem i with plain loops; s: G·L scores, qf and acc: G·D floats of scratch.
template <typename T>
void attend_loops(const Problem<T>& p, int64_t i, float* s, float* qf, float* acc) {
  const int64_t G = p.G, D = p.D, L = p.L, len = p.lens[i / p.KV];
  const T* k = p.k + i * L * D;
  const T* v = p.v + i * L * D;
  for (int64_t j = 0; j < G * D; ++j) qf[j] = load(p.q[i * G * D + j]) * p.scale;
  for (int64_t l = 0; l < len; ++l) {  // scores: each key row read once for the G rows
    const T* kl = k + l * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * load(kl[d]);
      s[g * L + l] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) softmax(s + g * L, len);
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t l = 0; l < len; ++l) {  // weighted values: each value row read once
    const T* vl = v + l * D;
    for (int64_t g = 0; g < G; ++g) {
      const float w = s[g * L + l];
      float* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += w * load(vl[d]);
    }
  }
  for (int64_t j = 0; j < G * D; ++j) store(p.out + i * G * D + j, acc[j]);
}

// A specialised attend for one (D, G): problem i with s as G·L floats of scratch.
using Attend = void (*)(const Problem<uint16_t>&, int64_t, float*);

#ifdef UNISD_AVX512_BF16

// r[j] = sum of the 16 lanes of x[j], j < 16: a transposing tree of adds, 45 shuffles and
// adds for the sixteen sums (one horizontal sum each would take about 8 apiece).
inline __m512 sum_lanes16(const __m512* x) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: (x0 + x2, x'0 + x'2, x1 + x3, x'1 + x'3)
    a[j] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * j], x[2 * j + 1]), _mm512_unpackhi_ps(x[2 * j], x[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the four rows' lane sums
    const __m512d u = _mm512_castps_pd(a[2 * j]), w = _mm512_castps_pd(a[2 * j + 1]);
    b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, w)), _mm512_castpd_ps(_mm512_unpackhi_pd(u, w)));
  }
  for (int j = 0; j < 2; ++j)  // add 128-bit lanes pairwise: 0 + 1, 2 + 3 of each operand
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

inline __m512 widen(const uint16_t* x) {  // 16 bf16 → 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x)), 16));
}

// Problem i for head size D (a multiple of 32) and G query rows; s: G·L scores of scratch.
template <int D, int G>
void attend_avx512(const Problem<uint16_t>& p, int64_t i, float* s) {
  constexpr int C = D / 32, V = D / 16;  // bf16 pairs per row in 512-bit words; fp32 words
  const int64_t L = p.L, len = p.lens[i / p.KV];
  const uint16_t* k = p.k + i * L * D;
  const uint16_t* v = p.v + i * L * D;
  __m512bh q[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) q[g][c] = (__m512bh)_mm512_loadu_si512(p.q + (i * G + g) * D + 32 * c);
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t l0 = 0; l0 < len; l0 += 16) {  // scores, sixteen keys at a time
    const int n = int(std::min<int64_t>(16, len - l0));
    for (int byte = 0; byte < n * D * 2; byte += 64)  // these keys' value rows, for the value pass: into L2 meanwhile
      _mm_prefetch(reinterpret_cast<const char*>(v + l0 * D) + byte, _MM_HINT_T1);
    for (int g = 0; g < G; ++g) {
      __m512 part[16];
      for (int j = 0; j < 16; ++j) {
        part[j] = _mm512_setzero_ps();
        if (j < n)  // keys past the slot's length are never read
          for (int c = 0; c < C; ++c)
            part[j] = _mm512_dpbf16_ps(part[j], q[g][c], (__m512bh)_mm512_loadu_si512(k + (l0 + j) * D + 32 * c));
      }
      _mm512_mask_storeu_ps(s + g * L + l0, __mmask16((1u << n) - 1), _mm512_mul_ps(sum_lanes16(part), scale));
    }
  }
  for (int g = 0; g < G; ++g) softmax(s + g * L, len);
  __m512 acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < V; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < len; ++l) {  // weighted values: each value row read once
    __m512 vl[V];
    for (int c = 0; c < V; ++c) vl[c] = widen(v + l * D + 16 * c);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(s[g * L + l]);
      for (int c = 0; c < V; ++c) acc[g][c] = _mm512_fmadd_ps(w, vl[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)  // round to nearest even, as torch's cast: the top half of x + 0x7FFF + lsb
    for (int c = 0; c < V; ++c) {
      const __m512i x = _mm512_castps_si512(acc[g][c]);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
      const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      _mm256_storeu_si256((__m256i*)(p.out + (i * G + g) * D + 16 * c), _mm512_cvtepi32_epi16(r));
    }
}

constexpr int MAX_G = 8;

template <int D, std::size_t... Gm1>
constexpr std::array<Attend, MAX_G> attend_table(std::index_sequence<Gm1...>) {
  return {&attend_avx512<D, int(Gm1) + 1>...};
}

// The specialised attend for (D, G), or null where the loops serve.
Attend specialised(int64_t D, int64_t G) {
  static constexpr auto d64 = attend_table<64>(std::make_index_sequence<MAX_G>{});
  static constexpr auto d128 = attend_table<128>(std::make_index_sequence<MAX_G>{});
  if (G < 1 || G > MAX_G) return nullptr;
  return D == 64 ? d64[G - 1] : D == 128 ? d128[G - 1] : nullptr;
}

#else

Attend specialised(int64_t, int64_t) { return nullptr; }

#endif

}  // namespace

// Problems 0..n·KV of p on every thread: `fast` where given, else the loops.
template <typename T>
void run(const Problem<T>& p, int64_t n, Attend fast) {
  // Threads take problems one at a time from a shared counter: slots lie in roughly
  // descending length (admission is longest-first), so equal ranges of problems per thread
  // would leave one thread most of the work (1.2× the layer's time, benchmarks/README.md).
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> s(p.G * p.L), qf(p.G * p.D), acc(p.G * p.D);
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n * p.KV;) {
      if constexpr (std::is_same_v<T, uint16_t>)
        if (fast) {
          fast(p, i, s.data());
          continue;
        }
      attend_loops(p, i, s.data(), qf.data(), acc.data());
    }
  });
}

// q [n, KV, G, D]; keys, values [S, KV, L, D], contiguous, S >= n; lens [n] int64, 1..L;
// q, keys and values all bf16 or all fp32.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor lens,
                               double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && keys.sizes() == values.sizes(), "decode_attention: shapes");
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && keys.scalar_type() == dtype &&
                  values.scalar_type() == dtype && lens.scalar_type() == at::kLong,
              "decode_attention: q, keys, values all bf16 or all fp32, and int64 lens");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "decode_attention: contiguous cache");
  const int64_t n = q.size(0), KV = q.size(1), G = q.size(2), D = q.size(3), L = keys.size(2);
  TORCH_CHECK(keys.size(0) >= n && keys.size(1) == KV && keys.size(3) == D && lens.numel() == n,
              "decode_attention: q, cache and lens disagree");
  const auto qc = q.contiguous();
  const auto lc = lens.contiguous();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b) TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "decode_attention: lens outside 1..L");
  auto out = torch::empty({n, KV, G, D}, q.options());
  if (dtype == at::kFloat) {
    run(Problem<float>{qc.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), out.data_ptr<float>(),
                       lp, KV, G, D, L, float(scale)},
        n, nullptr);
    return out;
  }
  const auto bits = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
  run(Problem<uint16_t>{bits(qc), bits(keys), bits(values), bits(out), lp, KV, G, D, L, float(scale)}, n,
      specialised(D, G));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention (bf16 or fp32) over each slot's cached prefix");
}
