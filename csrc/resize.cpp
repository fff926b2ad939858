#include "resize.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "parallel.hpp"
#include "resize_avx512.hpp"

namespace m2ort {

namespace {

// Pillow's fixed point: 8 bits of result, 2 spare bits, the rest fraction.
constexpr int kPrecisionBits = kResizePrecisionBits;
static_assert(kPrecisionBits == 32 - 8 - 2);
constexpr int32_t kHalf = int32_t{1} << (kPrecisionBits - 1);
constexpr int64_t kMinPixelsPerThread = 1 << 15;

// Each output pixel's taps along one axis: input index of the first, how many, their weights.
struct AxisTaps {
  int ksize = 0;
  std::vector<int32_t> first, count, weights;  // weights: out_size x ksize
};

double triangle(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Every expression below is evaluated in the same types and order as Pillow's precompute_coeffs
// and normalize_coeffs_8bpc (the box is the whole input: in0 = 0, in1 = in_size as floats), so
// that the rounded weights are identical.
AxisTaps axis_taps(int in_size, int out_size) {
  AxisTaps taps;
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  taps.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  taps.first.resize(out_size);
  taps.count.resize(out_size);
  taps.weights.assign(static_cast<size_t>(out_size) * taps.ksize, 0);
  std::vector<double> w(taps.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    const int xmin = std::max(0, static_cast<int>(center - support + 0.5));
    const int xmax = std::min(in_size, static_cast<int>(center + support + 0.5)) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = triangle((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    int32_t* k = &taps.weights[static_cast<size_t>(xx) * taps.ksize];
    for (int x = 0; x < xmax; ++x) {
      const double normalised = ww != 0.0 ? w[x] / ww : w[x];
      k[x] = normalised < 0 ? static_cast<int32_t>(-0.5 + normalised * (1 << kPrecisionBits))
                            : static_cast<int32_t>(0.5 + normalised * (1 << kPrecisionBits));
    }
    taps.first[xx] = xmin;
    taps.count[xx] = xmax;
  }
  return taps;
}

inline uint8_t clip8(int32_t sum) {
  const int32_t v = sum >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Each output pixel's weights moved into a window of one fixed length (ksize, or the whole input
// when that is shorter) that lies inside the input, zero weights filling the rest, so that the
// horizontal pass has a fixed-length inner loop. Zero terms leave Pillow's integer sums unchanged.
using FixedTaps = ResizeTaps;

FixedTaps fixed_taps(const AxisTaps& taps, int in_size) {
  FixedTaps fixed;
  fixed.ksize = std::min(taps.ksize, in_size);
  const int out_size = static_cast<int>(taps.first.size());
  fixed.first.resize(out_size);
  fixed.weights.assign(static_cast<size_t>(out_size) * fixed.ksize, 0);
  for (int xx = 0; xx < out_size; ++xx) {
    const int start = std::min(taps.first[xx], in_size - fixed.ksize);
    const int shift = taps.first[xx] - start;
    for (int x = 0; x < taps.count[xx]; ++x) {
      fixed.weights[static_cast<size_t>(xx) * fixed.ksize + shift + x] =
          taps.weights[static_cast<size_t>(xx) * taps.ksize + x];
    }
    fixed.first[xx] = start;
  }
  return fixed;
}

template <int KSize>
void horizontal_row(const uint8_t* src, const int32_t* first, const int32_t* weights, int ksize_runtime,
                    int64_t out_width, uint8_t* dst) {
  const int ksize = KSize > 0 ? KSize : ksize_runtime;
  for (int64_t xx = 0; xx < out_width; ++xx) {
    const int32_t* k = weights + xx * ksize;
    const uint8_t* px = src + static_cast<int64_t>(first[xx]) * 3;
    int32_t r = kHalf, g = kHalf, b = kHalf;
    for (int x = 0; x < ksize; ++x) {
      r += px[3 * x] * k[x];
      g += px[3 * x + 1] * k[x];
      b += px[3 * x + 2] * k[x];
    }
    dst[3 * xx] = clip8(r);
    dst[3 * xx + 1] = clip8(g);
    dst[3 * xx + 2] = clip8(b);
  }
}

// rows x in_width x 3 -> rows x out_width x 3. Fixed tap counts for the usual 2x and 4x shrinks;
// the AVX-512 kernel where its tables were built.
void horizontal_pass(const uint8_t* in, int64_t rows, int64_t in_width, const FixedTaps& taps,
                     const std::optional<HorizontalTables>& vector_tables, int64_t out_width, uint8_t* out) {
  if (vector_tables) {
    for (int64_t y = 0; y < rows; ++y)
      horizontal_row_avx512(in + y * in_width * 3, *vector_tables, out + y * out_width * 3);
    return;
  }
  auto row_fn = taps.ksize == 5 ? horizontal_row<5> : taps.ksize == 9 ? horizontal_row<9> : horizontal_row<0>;
  for (int64_t y = 0; y < rows; ++y) {
    row_fn(in + y * in_width * 3, taps.first.data(), taps.weights.data(), taps.ksize, out_width,
           out + y * out_width * 3);
  }
}

// One output row (row_bytes) from count input rows (rows, then every row_bytes) with Pillow's
// weights: sums along the contiguous row (one weight per input row) in tiles of sums the compiler
// keeps in vector registers; compiled twice (below) for the CPU's vector width.
[[gnu::always_inline]] inline void vertical_row_body(const uint8_t* rows, int64_t row_bytes, const int32_t* weights,
                                                     int count, uint8_t* dst) {
  constexpr int64_t kTile = 64;
  for (int64_t j0 = 0; j0 < row_bytes; j0 += kTile) {
    const int64_t width = std::min(kTile, row_bytes - j0);
    int32_t sums[kTile];
    for (int64_t j = 0; j < kTile; ++j) sums[j] = kHalf;
    for (int y = 0; y < count; ++y) {
      const uint8_t* src = rows + y * row_bytes + j0;
      const int32_t weight = weights[y];
      if (width == kTile) {
        for (int64_t j = 0; j < kTile; ++j) sums[j] += src[j] * weight;
      } else {
        for (int64_t j = 0; j < width; ++j) sums[j] += src[j] * weight;
      }
    }
    for (int64_t j = 0; j < width; ++j) dst[j0 + j] = clip8(sums[j]);
  }
}

// The vertical pass's rows: each output row's taps and, for the AVX-512 pass, its narrow
// quotients (resize_avx512.hpp) where it has them.
struct VerticalTaps {
  AxisTaps taps;
  std::vector<uint8_t> narrow;    // out_height: 1 where the row's weights are narrow
  std::vector<int8_t> quotients;  // out_height x ksize

  explicit VerticalTaps(AxisTaps axis) : taps(std::move(axis)) {
    const size_t out_height = taps.first.size(), ksize = static_cast<size_t>(taps.ksize);
    narrow.assign(out_height, 0);
    quotients.assign(out_height * ksize, 0);
    for (size_t yy = 0; yy < out_height; ++yy)
      narrow[yy] = narrow_quotients(&taps.weights[yy * ksize], taps.count[yy], &quotients[yy * ksize]) ? 1 : 0;
  }
};

// Output rows from the rows of `in` (row_offset: input row of in's first row); row_bytes per row.
void vertical_pass(const uint8_t* in, int64_t row_offset, int64_t row_bytes, const VerticalTaps& vertical,
                   int64_t out_height, uint8_t* out) {
  const AxisTaps& taps = vertical.taps;
  for (int64_t yy = 0; yy < out_height; ++yy) {
    vertical_row_body(in + (taps.first[yy] - row_offset) * row_bytes, row_bytes,
                      &taps.weights[static_cast<size_t>(yy) * taps.ksize], taps.count[yy], out + yy * row_bytes);
  }
}

#if defined(M2ORT_HAVE_AVX512_KERNELS)
M2ORT_AVX512_VBMI void vertical_pass_avx512(const uint8_t* in, int64_t row_offset, int64_t row_bytes,
                                            const VerticalTaps& vertical, int64_t out_height, uint8_t* out) {
  const AxisTaps& taps = vertical.taps;
  for (int64_t yy = 0; yy < out_height; ++yy) {
    const uint8_t* rows = in + (taps.first[yy] - row_offset) * row_bytes;
    const size_t k = static_cast<size_t>(yy) * taps.ksize;
    if (vertical.narrow[yy]) {
      vertical_row_narrow_avx512(rows, row_bytes, &vertical.quotients[k], taps.count[yy], out + yy * row_bytes);
    } else {
      vertical_row_body(rows, row_bytes, &taps.weights[k], taps.count[yy], out + yy * row_bytes);
    }
  }
}
#else
const auto vertical_pass_avx512 = vertical_pass;  // never picked: no AVX-512 tables are built
#endif

}  // namespace

std::vector<CpuKernel> resize_kernels(int64_t in_width, int64_t out_width) {
  std::vector<CpuKernel> kernels;
  if (avx512_vbmi_available() && in_width != out_width &&
      horizontal_tables(resize_taps(static_cast<int>(in_width), static_cast<int>(out_width)), in_width, out_width))
    kernels.push_back(CpuKernel::kAvx512Vbmi);
  kernels.push_back(CpuKernel::kScalar);
  return kernels;
}

ResizeTaps resize_taps(int in_size, int out_size) {
  if (in_size != out_size) return fixed_taps(axis_taps(in_size, out_size), in_size);
  ResizeTaps identity;
  identity.ksize = 1;
  identity.first.resize(out_size);
  for (int i = 0; i < out_size; ++i) identity.first[i] = i;
  identity.weights.assign(out_size, int32_t{1} << kPrecisionBits);
  return identity;
}

void resize_patches(const uint8_t* patches, int64_t n, int64_t in_height, int64_t in_width, int64_t out_height,
                    int64_t out_width, uint8_t* out, int64_t num_threads, CpuKernel kernel) {
  const int64_t in_bytes = in_height * in_width * 3, out_bytes = out_height * out_width * 3;
  const bool need_horizontal = out_width != in_width, need_vertical = out_height != in_height;
  if (!need_horizontal && !need_vertical) {
    std::memcpy(out, patches, static_cast<size_t>(n * in_bytes));
    return;
  }
  const VerticalTaps vertical_taps(axis_taps(static_cast<int>(in_height), static_cast<int>(out_height)));
  const AxisTaps& rows = vertical_taps.taps;
  const AxisTaps column_taps =
      need_horizontal ? axis_taps(static_cast<int>(in_width), static_cast<int>(out_width)) : AxisTaps{};
  const FixedTaps columns = fixed_taps(column_taps, static_cast<int>(in_width));
  // Both passes in AVX-512 where the CPU has it and the horizontal tables fit (kAuto), or on request.
  std::optional<HorizontalTables> vector_tables;
  if (need_horizontal && kernel != CpuKernel::kScalar && avx512_vbmi_available())
    vector_tables = horizontal_tables(columns, in_width, out_width);
  const auto vertical = vector_tables ? vertical_pass_avx512 : vertical_pass;
  // As Pillow: the horizontal pass only covers the input rows the vertical pass reads.
  const int64_t first_row = need_vertical ? rows.first.front() : 0;
  const int64_t last_row = need_vertical ? rows.first.back() + rows.count.back() : in_height;
  const int64_t threads = choose_threads(
      n, num_threads, std::max<int64_t>(1, kMinPixelsPerThread / std::max<int64_t>(1, in_height * in_width)));
  parallel_for(n, threads, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> between(static_cast<size_t>((last_row - first_row) * out_width * 3));
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* src = patches + i * in_bytes;
      uint8_t* dst = out + i * out_bytes;
      if (!need_vertical) {
        horizontal_pass(src, in_height, in_width, columns, vector_tables, out_width, dst);
      } else if (!need_horizontal) {
        vertical(src, 0, in_width * 3, vertical_taps, out_height, dst);
      } else {
        horizontal_pass(src + first_row * in_width * 3, last_row - first_row, in_width, columns, vector_tables,
                        out_width, between.data());
        vertical(between.data(), first_row, out_width * 3, vertical_taps, out_height, dst);
      }
    }
  });
}

}  // namespace m2ort
