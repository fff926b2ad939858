#include "layer_norm.hpp"

#include <algorithm>
#include <cmath>

#include "bf16.hpp"
#include "parallel.hpp"

namespace m2ort {

namespace {

// The sums' order in every kernel: value j of a row goes to lane j % kLanes (two AVX-512 registers
// of float32, so that the two dependency chains overlap), the lanes then added in a fixed tree.
constexpr int kLanes = 32;
constexpr int kVector = 16;
constexpr int64_t kMinRowsPerThread = 64;

// Lane partial sums -> one: halves added pairwise (16, 8, 4, 2, 1), the same in every kernel.
float tree_sum(float (&lanes)[kLanes]) {
  for (int half = kLanes / 2; half >= 1; half /= 2) {
    for (int l = 0; l < half; ++l) lanes[l] += lanes[l + half];
  }
  return lanes[0];
}

// y = x * scale + shift, then * weight + bias.
struct RowScale {
  float scale, shift;
};

// From the sums of d = x - pivot and of d^2 (pivot: the row's first value, so that a row far
// from zero keeps its variance's digits): scale = 1 / sqrt(var + eps) (in double, as torch adds
// its double eps), shift = -mean * scale.
RowScale row_scale(float pivot, float sum, float squares, int64_t width, double eps) {
  const float mean_d = sum / static_cast<float>(width);
  const float var = std::max(0.0f, squares / static_cast<float>(width) - mean_d * mean_d);
  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var) + eps));
  return {scale, -(pivot + mean_d) * scale};
}

// The affine parameters in float32, converted once per call.
struct Affine {
  std::vector<float> weight, bias;
  Affine(const uint16_t* w, const uint16_t* b, int64_t width) : weight(width), bias(width) {
    for (int64_t j = 0; j < width; ++j) {
      weight[j] = bf16_to_float(w[j]);
      bias[j] = bf16_to_float(b[j]);
    }
  }
};

void rows_scalar(const uint16_t* x, int64_t row_begin, int64_t row_end, int64_t width, const Affine& affine, double eps,
                 uint16_t* out) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint16_t* row = x + r * width;
    const float pivot = bf16_to_float(row[0]);
    float sums[kLanes] = {}, squares[kLanes] = {};
    for (int64_t j = 0; j < width; ++j) {
      const float d = bf16_to_float(row[j]) - pivot;
      sums[j % kLanes] += d;
      squares[j % kLanes] = std::fma(d, d, squares[j % kLanes]);
    }
    const RowScale s = row_scale(pivot, tree_sum(sums), tree_sum(squares), width, eps);
    for (int64_t j = 0; j < width; ++j) {
      const float t = std::fma(bf16_to_float(row[j]), s.scale, s.shift);
      out[r * width + j] = float_to_bf16(std::fma(t, affine.weight[j], affine.bias[j]));
    }
  }
}

#if defined(M2ORT_HAVE_AVX512_KERNELS)

// The first n (<= 16) of 16 lanes.
M2ORT_AVX512_BW inline __mmask16 first_lanes(int64_t n) {
  return n >= kVector ? __mmask16{0xFFFF} : n <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << n) - 1);
}

M2ORT_AVX512_BW inline __m512 load_bf16(const uint16_t* src, __mmask16 lanes) {
  const __m256i bits = _mm256_maskz_loadu_epi16(lanes, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

M2ORT_AVX512_BW inline void store_bf16(__m512 value, __mmask16 lanes, uint16_t* dst) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, odd), _mm512_set1_epi32(0x7FFF)), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(dst, lanes, _mm512_cvtepi32_epi16(rounded));
}

// tree_sum of the 32 lanes in two registers (lanes 0-15, 16-31), the same adds in the same order.
M2ORT_AVX512_BW inline float tree_sum(const __m512 (&halves)[2]) {
  const __m512 v16 = _mm512_add_ps(halves[0], halves[1]);
  const __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(v16), _mm512_extractf32x8_ps(v16, 1));
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
  return _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)));
}

// Adds the 16 values of d in `lanes` to sums and their squares to squares.
M2ORT_AVX512_BW inline void accumulate(__m512 d, __mmask16 lanes, __m512& sums, __m512& squares) {
  sums = _mm512_mask_add_ps(sums, lanes, sums, d);
  squares = _mm512_mask3_fmadd_ps(d, d, squares, lanes);
}

// Rows [row_begin, row_end): whole registers, then the row's last partial one under a mask.
M2ORT_AVX512_BW void rows_avx512(const uint16_t* x, int64_t row_begin, int64_t row_end, int64_t width,
                                 const Affine& affine, double eps, uint16_t* out) {
  const __mmask16 all = 0xFFFF;
  const int64_t whole_pairs = width / kLanes * kLanes, whole = width / kVector * kVector;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint16_t* row = x + r * width;
    const float pivot = bf16_to_float(row[0]);
    const __m512 pivots = _mm512_set1_ps(pivot);
    __m512 sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512 squares[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < whole_pairs; j += kLanes) {
      accumulate(_mm512_sub_ps(load_bf16(row + j, all), pivots), all, sums[0], squares[0]);
      accumulate(_mm512_sub_ps(load_bf16(row + j + kVector, all), pivots), all, sums[1], squares[1]);
    }
    for (int half = 0; half < 2 && whole_pairs + kVector * half < width; ++half) {
      const int64_t j = whole_pairs + kVector * half;
      const __mmask16 lanes = first_lanes(width - j);
      accumulate(_mm512_sub_ps(load_bf16(row + j, lanes), pivots), lanes, sums[half], squares[half]);
    }
    const RowScale s = row_scale(pivot, tree_sum(sums), tree_sum(squares), width, eps);
    const __m512 scale = _mm512_set1_ps(s.scale), shift = _mm512_set1_ps(s.shift);
    auto normalise = [&](int64_t j, __mmask16 lanes) M2ORT_AVX512_BW {
      const __m512 t = _mm512_fmadd_ps(load_bf16(row + j, lanes), scale, shift);
      const __m512 y = _mm512_fmadd_ps(t, _mm512_maskz_loadu_ps(lanes, affine.weight.data() + j),
                                       _mm512_maskz_loadu_ps(lanes, affine.bias.data() + j));
      store_bf16(y, lanes, out + r * width + j);
    };
    for (int64_t j = 0; j < whole; j += kVector) normalise(j, all);
    if (whole < width) normalise(whole, first_lanes(width - whole));
  }
}

#endif

}  // namespace

std::vector<CpuKernel> layer_norm_kernels() {
  if (avx512_bw_available()) return {CpuKernel::kAvx512Bw, CpuKernel::kScalar};
  return {CpuKernel::kScalar};
}

void layer_norm_bf16(const uint16_t* x, int64_t rows, int64_t width, const uint16_t* weight, const uint16_t* bias,
                     double eps, uint16_t* out, int64_t num_threads, CpuKernel kernel) {
  if (rows <= 0 || width <= 0) return;
  const Affine affine(weight, bias, width);
  const bool vector = kernel != CpuKernel::kScalar && avx512_bw_available();
  const int64_t threads = choose_threads(rows, num_threads, kMinRowsPerThread);
  parallel_for(rows, threads, [&](int64_t begin, int64_t end) {
#if defined(M2ORT_HAVE_AVX512_KERNELS)
    if (vector) return rows_avx512(x, begin, end, width, affine, eps, out);
#endif
    (void)vector;
    rows_scalar(x, begin, end, width, affine, eps, out);
  });
}

}  // namespace m2ort
