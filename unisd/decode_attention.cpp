// One decode step's attention for the fast backend (unisd/decode_attention.py), bf16.
//
// For slot b < n and KV head h, with G = H / KV query rows q_g sharing that head and the
// slot's first len_b cached positions:
//   s_g,l = scale · q_g · k_l,   p_g = softmax(s_g),   out_g = sum_l p_g,l · v_l
// in fp32, the result rounded to bf16. One pass over each slot's keys and one over its
// values, each read once for all G rows; work split over (slot, head) pairs. Plain loops
// that the compiler vectorises (built with -O3 -march=native -ffast-math: the fp32 sums
// reassociate, as in any SIMD reduction; every value here is finite).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float from_bf16(uint16_t x) {
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

}  // namespace

// q [n, KV, G, D]; keys, values [S, KV, L, D], contiguous, S >= n; lens [n] int64, 1..L.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor lens,
                               double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && keys.sizes() == values.sizes(), "decode_attention: shapes");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16 && lens.scalar_type() == at::kLong,
              "decode_attention: bf16 q, keys, values and int64 lens");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "decode_attention: contiguous cache");
  const int64_t n = q.size(0), KV = q.size(1), G = q.size(2), D = q.size(3), L = keys.size(2);
  TORCH_CHECK(keys.size(0) >= n && keys.size(1) == KV && keys.size(3) == D && lens.numel() == n,
              "decode_attention: q, cache and lens disagree");
  const auto qc = q.contiguous();
  const auto lc = lens.contiguous();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b) TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "decode_attention: lens outside 1..L");
  auto out = torch::empty({n, KV, G, D}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float sc = float(scale);

  at::parallel_for(0, n * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), s(G * L), acc(G * D);
    for (int64_t i = begin; i < end; ++i) {  // i = b·KV + h: slot b's head h in q, out and the cache
      const int64_t len = lp[i / KV];
      const uint16_t* k = kp + i * L * D;
      const uint16_t* v = vp + i * L * D;
      for (int64_t j = 0; j < G * D; ++j) qf[j] = from_bf16(qp[i * G * D + j]) * sc;
      for (int64_t l = 0; l < len; ++l) {  // scores: each key row read once for the G rows
        const uint16_t* kl = k + l * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * from_bf16(kl[d]);
          s[g * L + l] = dot;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax over the slot's positions
        float* sg = s.data() + g * L;
        const float m = *std::max_element(sg, sg + len);
        float z = 0.f;
        for (int64_t l = 0; l < len; ++l) z += (sg[l] = std::exp(sg[l] - m));
        const float inv = 1.f / z;
        for (int64_t l = 0; l < len; ++l) sg[l] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < len; ++l) {  // weighted values: each value row read once
        const uint16_t* vl = v + l * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * L + l];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * from_bf16(vl[d]);
        }
      }
      for (int64_t j = 0; j < G * D; ++j) op[i * G * D + j] = to_bf16(acc[j]);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "bf16 decode attention over each slot's cached prefix");
}
