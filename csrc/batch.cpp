#include "batch.hpp"

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>

#include "batch_avx512.hpp"
#include "bf16.hpp"
#include "parallel.hpp"

namespace m2ort {

namespace {
// Enough pixels per thread that starting a thread (~10-20 us) is worth it.
constexpr int64_t kMinPixelsPerThread = 1 << 15;
// A batch (64 spots: tens of MB) leaves the caches before the model reads it, so the vector
// kernels write a call's output of more than half a core's L2 straight to memory (streaming),
// sparing a read of each line first (the host path's bf16 tokens, in calls of ~20-60 spots: 1.3x
// the assembly there).
constexpr int64_t kStreamingBytes = int64_t{1} << 20;
constexpr uint8_t kWhite = 255;
}  // namespace

namespace {

// A uint8 has 256 values: a per-channel table computed in double gives the correctly rounded
// float32 of (v / 255 - mean) / std, and turns the inner loop into loads and stores (or, on
// AVX-512 VBMI, into byte permutes over the same table's bytes).
template <typename Out>
struct NormalizationTable {
  Out values[3][256];
  uint8_t bytes[3][sizeof(Out)][256];  // byte b of each value (x86: little-endian), for the permutes

  template <typename Convert>
  NormalizationTable(const std::array<double, 3>& mean, const std::array<double, 3>& std_dev, Convert convert) {
    for (int c = 0; c < 3; ++c) {
      for (int v = 0; v < 256; ++v) {
        values[c][v] = convert(static_cast<float>((v / 255.0 - mean[c]) / std_dev[c]));
        uint8_t value[sizeof(Out)];
        std::memcpy(value, &values[c][v], sizeof(Out));
        for (size_t b = 0; b < sizeof(Out); ++b) bytes[c][b][v] = value[b];
      }
    }
  }

  // n interleaved RGB pixels -> n interleaved values (the token layout's runs).
  void map_pixels(const uint8_t* src, int64_t n, Out* dst) const {
    for (int64_t x = 0; x < n; ++x) {
      dst[3 * x] = values[0][src[3 * x]];
      dst[3 * x + 1] = values[1][src[3 * x + 1]];
      dst[3 * x + 2] = values[2][src[3 * x + 2]];
    }
  }
};

template <typename Out>
void assemble_planes(const uint8_t* patches, int64_t n, int64_t height, int64_t width,
                     const NormalizationTable<Out>& table, Out* out, int64_t num_threads, CpuKernel kernel) {
  const bool vector = kernel != CpuKernel::kScalar && avx512_vbmi_available();
  const int64_t plane = height * width;
  const int64_t rows = n * height;  // unit of work: one image row of one patch
  const bool streaming = n * 3 * plane * static_cast<int64_t>(sizeof(Out)) >= kStreamingBytes;
  const int64_t threads = choose_threads(rows, num_threads, kMinPixelsPerThread / std::max<int64_t>(1, width));
  parallel_for(rows, threads, [&](int64_t begin, int64_t end) {
    if (vector) {
      assemble_rows_avx512(patches, begin, end, height, width, table.bytes, reinterpret_cast<uint8_t*>(out), streaming);
      return;
    }
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row / height, y = row % height;
      const uint8_t* src = patches + row * width * 3;
      Out* red = out + i * 3 * plane + y * width;
      Out* green = red + plane;
      Out* blue = green + plane;
      for (int64_t x = 0; x < width; ++x) {
        red[x] = table.values[0][src[3 * x]];
        green[x] = table.values[1][src[3 * x + 1]];
        blue[x] = table.values[2][src[3 * x + 2]];
      }
    }
  });
}

// Token (gy, gx) of patch i is the p x p square at (gx * p, gy * p): p runs of p pixels, written in
// order (each token's values are contiguous in out) from p rows of the patch. kPatchPx > 0 fixes p
// at compile time (the model's 16, 8 and 4: unrolled runs); 0 takes patch_px.
// affine: bf16 values computed (batch_avx512.hpp) where affine_tokens_bf16_exact, else nullptr.
template <int64_t kPatchPx, typename Out>
void assemble_tokens(const uint8_t* patches, int64_t n, int64_t height, int64_t width, int64_t patch_px,
                     const NormalizationTable<Out>& table, Out* out, int64_t num_threads, CpuKernel kernel,
                     const AffineBf16* affine) {
  const int64_t p = kPatchPx > 0 ? kPatchPx : patch_px;
  const int64_t grid_h = height / p, grid_w = width / p;
  const int64_t token_values = p * p * 3, row_bytes = width * 3;
  const int64_t grid_rows = n * grid_h;  // unit of work: one row of tokens of one patch
  const int64_t threads = choose_threads(grid_rows, num_threads, kMinPixelsPerThread / std::max<int64_t>(1, width * p));
  // float32 tokens: looking up four byte planes in all three channels' tables costs more than the
  // scalar loop's loads (bench/core_kernels.py), so auto takes the loop there.
  const bool auto_float = kernel == CpuKernel::kAuto && std::is_same_v<Out, float>;
  const bool streaming = n * height * width * 3 * static_cast<int64_t>(sizeof(Out)) >= kStreamingBytes;
  const bool vector =
      kernel != CpuKernel::kScalar && !auto_float && avx512_vbmi_available() && token_kernel_avx512_fits(p);
  parallel_for(grid_rows, threads, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<Out, uint16_t>) {
      if (affine != nullptr) {
        assemble_token_rows_affine_bf16(patches, begin, end, width, p, *affine, out, streaming);
        return;
      }
    }
    if (vector) {
      assemble_token_rows_avx512(patches, begin, end, width, p, table.bytes, reinterpret_cast<uint8_t*>(out),
                                 streaming);
      return;
    }
    for (int64_t grid_row = begin; grid_row < end; ++grid_row) {
      const uint8_t* src = patches + grid_row * p * row_bytes;  // patch i's rows gy * p ...
      Out* dst = out + grid_row * grid_w * token_values;
      for (int64_t gx = 0; gx < grid_w; ++gx) {
        for (int64_t p1 = 0; p1 < p; ++p1, dst += p * 3) {
          table.map_pixels(src + p1 * row_bytes + gx * p * 3, p, dst);
        }
      }
    }
  });
}

// The affine bf16 kernel's coefficients for mean and std, where it runs (kernel kAuto or
// kAvx512Bf16, tokens it fits) and gives the table's bits; nullopt otherwise.
std::optional<AffineBf16> exact_affine_bf16(const NormalizationTable<uint16_t>& table, int64_t patch_px,
                                            const std::array<double, 3>& mean, const std::array<double, 3>& std_dev,
                                            CpuKernel kernel) {
  if (patch_px <= 0 || !token_kernel_avx512_fits(patch_px)) return std::nullopt;
  if (kernel != CpuKernel::kAuto && kernel != CpuKernel::kAvx512Bf16) return std::nullopt;
  AffineBf16 affine;
  for (int c = 0; c < 3; ++c) {
    affine.scale[c] = static_cast<float>(1.0 / (255.0 * std_dev[c]));
    affine.shift[c] = static_cast<float>(-mean[c] / std_dev[c]);
  }
  if (!affine_tokens_bf16_exact(affine, table.values)) return std::nullopt;
  return affine;
}

template <typename Out>
void assemble_with_table(const uint8_t* patches, int64_t n, int64_t height, int64_t width, int64_t patch_px,
                         const NormalizationTable<Out>& table, Out* out, int64_t num_threads, CpuKernel kernel,
                         const AffineBf16* affine = nullptr) {
  if (patch_px == 16) {
    assemble_tokens<16>(patches, n, height, width, patch_px, table, out, num_threads, kernel, affine);
  } else if (patch_px == 8) {
    assemble_tokens<8>(patches, n, height, width, patch_px, table, out, num_threads, kernel, affine);
  } else if (patch_px == 4) {
    assemble_tokens<4>(patches, n, height, width, patch_px, table, out, num_threads, kernel, affine);
  } else if (patch_px > 0) {
    assemble_tokens<0>(patches, n, height, width, patch_px, table, out, num_threads, kernel, affine);
  } else {
    assemble_planes(patches, n, height, width, table, out, num_threads, kernel);
  }
}

}  // namespace

std::vector<CpuKernel> assemble_kernels(int64_t patch_px) {
  const bool fits = patch_px == 0 || token_kernel_avx512_fits(patch_px);
  if (patch_px > 0 && fits && avx512_bf16_available())
    return {CpuKernel::kAvx512Bf16, CpuKernel::kAvx512Vbmi, CpuKernel::kScalar};
  if (fits && avx512_vbmi_available()) return {CpuKernel::kAvx512Vbmi, CpuKernel::kScalar};
  return {CpuKernel::kScalar};
}

bool affine_bf16_runs(const std::array<double, 3>& mean, const std::array<double, 3>& std_dev) {
  const NormalizationTable<uint16_t> table(mean, std_dev, float_to_bf16);
  return exact_affine_bf16(table, 16, mean, std_dev, CpuKernel::kAuto).has_value();
}

void assemble_batch(const uint8_t* patches, int64_t n, int64_t height, int64_t width, int64_t patch_px,
                    const std::array<double, 3>& mean, const std::array<double, 3>& std_dev, float* out,
                    int64_t num_threads, CpuKernel kernel) {
  const NormalizationTable<float> table(mean, std_dev, [](float v) { return v; });
  assemble_with_table(patches, n, height, width, patch_px, table, out, num_threads, kernel);
}

void assemble_batch_bf16(const uint8_t* patches, int64_t n, int64_t height, int64_t width, int64_t patch_px,
                         const std::array<double, 3>& mean, const std::array<double, 3>& std_dev, uint16_t* out,
                         int64_t num_threads, CpuKernel kernel) {
  const NormalizationTable<uint16_t> table(mean, std_dev, float_to_bf16);
  const std::optional<AffineBf16> affine = exact_affine_bf16(table, patch_px, mean, std_dev, kernel);
  assemble_with_table(patches, n, height, width, patch_px, table, out, num_threads, kernel,
                      affine ? &*affine : nullptr);
}

void crop_patches(const RegionView& region, const int64_t* origins_xy, int64_t n, int64_t size_px, uint8_t* out,
                  int64_t num_threads) {
  const int64_t out_row_bytes = size_px * 3;
  const bool packed_pixels = region.pixel_stride == 3 && region.channel_stride == 1;
  const int64_t rows = n * size_px;  // unit of work: one output row
  const int64_t threads = choose_threads(rows, num_threads, kMinPixelsPerThread / std::max<int64_t>(1, size_px));
  parallel_for(rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row / size_px, r = row % size_px;
      const int64_t origin_x = origins_xy[2 * i], origin_y = origins_xy[2 * i + 1];
      uint8_t* dst = out + row * out_row_bytes;
      // Rejecting far-away origins first keeps the arithmetic below free of int64 overflow.
      const bool row_outside = origin_y >= region.height || origin_y <= -size_px || origin_x >= region.width ||
                               origin_x <= -size_px || origin_y + r >= region.height || origin_y + r < 0;
      if (row_outside) {
        std::memset(dst, kWhite, static_cast<size_t>(out_row_bytes));
        continue;
      }
      // Output columns [first, last) come from the region; the rest are white.
      const int64_t first = std::max<int64_t>(0, -origin_x);
      const int64_t last = std::min<int64_t>(size_px, region.width - origin_x);
      std::memset(dst, kWhite, static_cast<size_t>(first * 3));
      std::memset(dst + last * 3, kWhite, static_cast<size_t>((size_px - last) * 3));
      const uint8_t* src = region.data + (origin_y + r) * region.row_stride + (origin_x + first) * region.pixel_stride;
      uint8_t* dst_inside = dst + first * 3;
      if (packed_pixels) {
        std::memcpy(dst_inside, src, static_cast<size_t>((last - first) * 3));
      } else {
        for (int64_t x = 0; x < last - first; ++x) {
          const uint8_t* pixel = src + x * region.pixel_stride;
          dst_inside[3 * x] = pixel[0];
          dst_inside[3 * x + 1] = pixel[region.channel_stride];
          dst_inside[3 * x + 2] = pixel[2 * region.channel_stride];
        }
      }
    }
  });
}

}  // namespace m2ort
