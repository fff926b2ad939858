#include "resize_avx512.hpp"

#include <algorithm>
#include <cstdlib>

#include "simd.hpp"

namespace m2ort {

namespace {
constexpr int kGroupBytes = 16;        // output bytes per group: one int32 lane each
constexpr int64_t kWindowBytes = 128;  // what one two-register byte permute can gather from
}  // namespace

std::optional<HorizontalTables> horizontal_tables(const ResizeTaps& taps, int64_t in_width, int64_t out_width) {
  HorizontalTables tables;
  tables.ksize = taps.ksize;
  tables.row_bytes = in_width * 3;
  tables.out_bytes = out_width * 3;
  tables.groups = (tables.out_bytes + kGroupBytes - 1) / kGroupBytes;
  const size_t per_group = static_cast<size_t>(taps.ksize) * kGroupBytes;
  tables.window.resize(static_cast<size_t>(tables.groups));
  tables.index.assign(per_group * 4 * static_cast<size_t>(tables.groups), 0);
  tables.weights.assign(per_group * static_cast<size_t>(tables.groups), 0);
  for (int64_t g = 0; g < tables.groups; ++g) {
    const int64_t first_byte = g * kGroupBytes, end_byte = std::min(first_byte + kGroupBytes, tables.out_bytes);
    // The fixed taps' windows start at non-decreasing pixels: the group's first pixel reads lowest.
    const int64_t window = static_cast<int64_t>(taps.first[first_byte / 3]) * 3;
    tables.window[g] = window;
    for (int64_t byte = first_byte; byte < end_byte; ++byte) {
      const int64_t pixel = byte / 3, channel = byte % 3, lane = byte - first_byte;
      for (int k = 0; k < taps.ksize; ++k) {
        const int64_t offset = (taps.first[pixel] + k) * 3 + channel - window;
        if (offset < 0 || offset >= kWindowBytes) return std::nullopt;
        const size_t slot = static_cast<size_t>(g) * per_group + static_cast<size_t>(k) * kGroupBytes + lane;
        tables.index[slot * 4] = static_cast<uint8_t>(offset);
        tables.weights[slot] = taps.weights[static_cast<size_t>(pixel) * taps.ksize + k];
      }
    }
  }
  return tables;
}

#if defined(M2ORT_HAVE_AVX512_KERNELS)

namespace {

M2ORT_AVX512_VBMI void horizontal_row(const uint8_t* src, const HorizontalTables& tables, uint8_t* dst) {
  constexpr int kPrecisionBits = kResizePrecisionBits;
  const __m512i half = _mm512_set1_epi32(int32_t{1} << (kPrecisionBits - 1));
  const __m512i zero = _mm512_setzero_si512();
  constexpr __mmask64 kLowByteOfEachLane = 0x1111111111111111ULL;
  const int ksize = tables.ksize;
  for (int64_t g = 0; g < tables.groups; ++g) {
    // Masked loads: bytes past the row are neither read nor faulted on.
    const int64_t window = tables.window[g], left = tables.row_bytes - window;
    const __m512i low = _mm512_maskz_loadu_epi8(first_bytes(left), src + window);
    const __m512i high = _mm512_maskz_loadu_epi8(first_bytes(left - 64), src + window + 64);
    const uint8_t* index = &tables.index[static_cast<size_t>(g) * ksize * kGroupBytes * 4];
    const int32_t* weights = &tables.weights[static_cast<size_t>(g) * ksize * kGroupBytes];
    __m512i sums = half;
    for (int k = 0; k < ksize; ++k) {
      const __m512i pixels = _mm512_maskz_permutex2var_epi8(kLowByteOfEachLane, low,
                                                            _mm512_loadu_si512(index + k * kGroupBytes * 4), high);
      sums = _mm512_add_epi32(sums, _mm512_mullo_epi32(pixels, _mm512_loadu_si512(weights + k * kGroupBytes)));
    }
    // clip8: >> 22, then 0..255 (negatives to 0 first; the unsigned narrowing saturates above).
    const __m128i bytes = _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(sums, kPrecisionBits), zero));
    const int64_t out_left = tables.out_bytes - g * kGroupBytes;
    const __mmask16 store = out_left >= kGroupBytes ? __mmask16{0xFFFF} : (__mmask16{1} << out_left) - 1;
    _mm_mask_storeu_epi8(dst + g * kGroupBytes, store, bytes);
  }
}

}  // namespace

// Compiled for the baseline: callers need no target attribute of their own.
void horizontal_row_avx512(const uint8_t* src, const HorizontalTables& tables, uint8_t* dst) {
  horizontal_row(src, tables, dst);
}

#else

void horizontal_row_avx512(const uint8_t*, const HorizontalTables&, uint8_t*) {
  std::abort();
}

#endif

}  // namespace m2ort
