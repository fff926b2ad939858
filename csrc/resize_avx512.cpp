#include "resize_avx512.hpp"

#include <algorithm>
#include <cstdlib>

#include "simd.hpp"

namespace m2ort {

namespace {
constexpr int kGroupBytes = 16;        // output bytes per group: one int32 lane each
constexpr int kBlockBytes = 32;        // output bytes per narrow block: one int16 lane each
constexpr int64_t kWindowBytes = 128;  // what one two-register byte permute can gather from
constexpr int kMaxQuotientSum = 128;   // 255 * 128 + 2^6 < 2^15

// Taps a narrow step takes two at a time.
constexpr int narrow_pairs(int ksize) {
  return (ksize + 1) / 2;
}

// The narrow tables of block b (HorizontalTables), or false where it cannot run narrow.
bool narrow_block_tables(const ResizeTaps& taps, int64_t b, HorizontalTables& tables) {
  const size_t per_block = static_cast<size_t>(narrow_pairs(taps.ksize)) * 64;
  const int64_t first_byte = b * kBlockBytes, end_byte = std::min(first_byte + kBlockBytes, tables.out_bytes);
  const int64_t window = static_cast<int64_t>(taps.first[first_byte / 3]) * 3;
  std::vector<int8_t> quotients(static_cast<size_t>(taps.ksize));
  for (int64_t byte = first_byte; byte < end_byte; ++byte) {
    const int64_t pixel = byte / 3, channel = byte % 3, lane = byte - first_byte;
    if (!narrow_quotients(&taps.weights[static_cast<size_t>(pixel) * taps.ksize], taps.ksize, quotients.data()))
      return false;
    for (int k = 0; k < taps.ksize; ++k) {
      const int64_t offset = (taps.first[pixel] + k) * 3 + channel - window;
      if (offset < 0 || offset >= kWindowBytes) return false;
      const size_t slot = static_cast<size_t>(b) * per_block + static_cast<size_t>(k / 2) * 64 + 2 * lane + k % 2;
      tables.narrow_index[slot] = static_cast<uint8_t>(offset);
      tables.narrow_quotient_bytes[slot] = quotients[static_cast<size_t>(k)];
    }
  }
  tables.narrow_window[b] = window;
  return true;
}
}  // namespace

bool narrow_quotients(const int32_t* weights, int count, int8_t* quotients) {
  constexpr int32_t kStep = int32_t{1} << kNarrowShift;
  int sum = 0;
  for (int k = 0; k < count; ++k) {
    if (weights[k] < 0 || weights[k] % kStep != 0 || weights[k] / kStep > 127) return false;
    quotients[k] = static_cast<int8_t>(weights[k] / kStep);
    sum += quotients[k];
  }
  return sum <= kMaxQuotientSum;
}

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
  const int64_t blocks = (tables.out_bytes + kBlockBytes - 1) / kBlockBytes;
  const size_t narrow_bytes = static_cast<size_t>(blocks) * static_cast<size_t>(narrow_pairs(taps.ksize)) * 64;
  tables.narrow.assign(static_cast<size_t>(blocks), 0);
  tables.narrow_window.assign(static_cast<size_t>(blocks), 0);
  tables.narrow_index.assign(narrow_bytes, 0);
  tables.narrow_quotient_bytes.assign(narrow_bytes, 0);
  bool any_narrow = false;
  for (int64_t b = 0; b < blocks; ++b) {
    tables.narrow[b] = narrow_block_tables(taps, b, tables) ? 1 : 0;
    any_narrow = any_narrow || tables.narrow[b];
  }
  if (!any_narrow) tables.narrow.clear();
  return tables;
}

#if defined(M2ORT_HAVE_AVX512_KERNELS)

namespace {

// Output bytes [16 g, 16 g + 16) of a row in int32 lanes, Pillow's 22-bit weights (ksize: the
// tables', read once per row by the caller: the byte stores may alias the tables' fields).
M2ORT_AVX512_VBMI inline void wide_group(const uint8_t* src, const HorizontalTables& tables, int ksize, int64_t g,
                                         uint8_t* dst) {
  constexpr int kPrecisionBits = kResizePrecisionBits;
  constexpr __mmask64 kLowByteOfEachLane = 0x1111111111111111ULL;
  // Masked loads: bytes past the row are neither read nor faulted on.
  const int64_t window = tables.window[g], left = tables.row_bytes - window;
  const __m512i low = _mm512_maskz_loadu_epi8(first_bytes(left), src + window);
  const __m512i high = _mm512_maskz_loadu_epi8(first_bytes(left - 64), src + window + 64);
  const uint8_t* index = &tables.index[static_cast<size_t>(g) * ksize * kGroupBytes * 4];
  const int32_t* weights = &tables.weights[static_cast<size_t>(g) * ksize * kGroupBytes];
  __m512i sums = _mm512_set1_epi32(int32_t{1} << (kPrecisionBits - 1));
  for (int k = 0; k < ksize; ++k) {
    const __m512i pixels =
        _mm512_maskz_permutex2var_epi8(kLowByteOfEachLane, low, _mm512_loadu_si512(index + k * kGroupBytes * 4), high);
    sums = _mm512_add_epi32(sums, _mm512_mullo_epi32(pixels, _mm512_loadu_si512(weights + k * kGroupBytes)));
  }
  // clip8: >> 22, then 0..255 (negatives to 0 first; the unsigned narrowing saturates above).
  const __m128i bytes =
      _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(sums, kPrecisionBits), _mm512_setzero_si512()));
  const int64_t out_left = tables.out_bytes - g * kGroupBytes;
  const __mmask16 store = out_left >= kGroupBytes ? __mmask16{0xFFFF} : (__mmask16{1} << out_left) - 1;
  _mm_mask_storeu_epi8(dst + g * kGroupBytes, store, bytes);
}

// 32 output bytes (out_left of them: at most 32 are stored) in int16 lanes from the 128-byte
// window at src + window, the narrow quotients two taps (a pair) at a time. Pairs > 0 fixes their
// count at compile time (unrolled); 0 takes pairs_runtime.
template <int Pairs>
M2ORT_AVX512_VBMI inline void narrow_block(const uint8_t* src, int64_t row_bytes, int64_t window, const uint8_t* index,
                                           const int8_t* quotients, int pairs_runtime, uint8_t* dst, int64_t out_left) {
  const int pairs = Pairs > 0 ? Pairs : pairs_runtime;
  const int64_t left = row_bytes - window;
  const __m512i low = _mm512_maskz_loadu_epi8(first_bytes(left), src + window);
  const __m512i high = _mm512_maskz_loadu_epi8(first_bytes(left - 64), src + window + 64);
  __m512i sums = _mm512_set1_epi16(int16_t{1} << (kResizePrecisionBits - 1 - kNarrowShift));
  for (int k = 0; k < pairs; ++k) {
    const __m512i pixels = _mm512_permutex2var_epi8(low, _mm512_loadu_si512(index + 64 * k), high);
    sums = _mm512_add_epi16(sums, _mm512_maddubs_epi16(pixels, _mm512_loadu_si512(quotients + 64 * k)));
  }
  // Non-negative sums below 2^15: the unsigned narrowing is clip8.
  const __m256i bytes = _mm512_cvtusepi16_epi8(_mm512_srli_epi16(sums, kResizePrecisionBits - kNarrowShift));
  _mm256_mask_storeu_epi8(dst, static_cast<__mmask32>(first_bytes(out_left)), bytes);
}

M2ORT_AVX512_VBMI void wide_row(const uint8_t* src, const HorizontalTables& tables, uint8_t* dst) {
  const int ksize = tables.ksize;
  for (int64_t g = 0; g < tables.groups; ++g) wide_group(src, tables, ksize, g, dst);
}

// A row with narrow blocks (the rest in wide groups).
template <int Pairs>
M2ORT_AVX512_VBMI void mixed_row(const uint8_t* src, const HorizontalTables& tables, uint8_t* dst) {
  const int ksize = tables.ksize;
  // The tables' pointers in locals: the byte stores below may alias anything, fields included.
  const int64_t blocks = static_cast<int64_t>(tables.narrow.size()), groups = tables.groups;
  const int64_t row_bytes = tables.row_bytes, out_bytes = tables.out_bytes;
  const int pairs = narrow_pairs(ksize);
  const uint8_t* narrow = tables.narrow.data();
  const int64_t* windows = tables.narrow_window.data();
  const uint8_t* index = tables.narrow_index.data();
  const int8_t* quotients = tables.narrow_quotient_bytes.data();
  for (int64_t b = 0; b < blocks; ++b) {
    if (narrow[b]) {
      const int64_t offset = b * pairs * 64;
      narrow_block<Pairs>(src, row_bytes, windows[b], index + offset, quotients + offset, pairs, dst + b * kBlockBytes,
                          out_bytes - b * kBlockBytes);
      continue;
    }
    for (int64_t g = 2 * b; g < std::min(2 * b + 2, groups); ++g) wide_group(src, tables, ksize, g, dst);
  }
}

M2ORT_AVX512_VBMI void vertical_row_narrow(const uint8_t* rows, int64_t row_bytes, const int8_t* quotients, int count,
                                           uint8_t* dst) {
  const __m512i half = _mm512_set1_epi16(int16_t{1} << (kResizePrecisionBits - 1 - kNarrowShift));
  for (int64_t j0 = 0; j0 < row_bytes; j0 += 64) {
    const __mmask64 mask = first_bytes(row_bytes - j0);
    __m512i low = half, high = half;  // lanes of the bytes 0-7 and 8-15 of each 16-byte lane
    for (int k = 0; k < count; k += 2) {
      const bool pair = k + 1 < count;
      const __m512i a = _mm512_maskz_loadu_epi8(mask, rows + k * row_bytes + j0);
      const __m512i b = pair ? _mm512_maskz_loadu_epi8(mask, rows + (k + 1) * row_bytes + j0) : _mm512_setzero_si512();
      const uint8_t qa = static_cast<uint8_t>(quotients[k]), qb = pair ? static_cast<uint8_t>(quotients[k + 1]) : 0;
      const __m512i weights = _mm512_set1_epi16(static_cast<int16_t>(qa | qb << 8));
      low = _mm512_add_epi16(low, _mm512_maddubs_epi16(_mm512_unpacklo_epi8(a, b), weights));
      high = _mm512_add_epi16(high, _mm512_maddubs_epi16(_mm512_unpackhi_epi8(a, b), weights));
    }
    constexpr int kShift = kResizePrecisionBits - kNarrowShift;
    const __m512i bytes = _mm512_packus_epi16(_mm512_srli_epi16(low, kShift), _mm512_srli_epi16(high, kShift));
    _mm512_mask_storeu_epi8(dst + j0, mask, bytes);
  }
}

}  // namespace

// Compiled for the baseline: callers need no target attribute of their own.
void horizontal_row_avx512(const uint8_t* src, const HorizontalTables& tables, uint8_t* dst) {
  if (tables.narrow.empty()) {
    wide_row(src, tables, dst);
  } else if (tables.ksize == 5) {  // the 2x shrink's
    mixed_row<narrow_pairs(5)>(src, tables, dst);
  } else {
    mixed_row<0>(src, tables, dst);
  }
}

void vertical_row_narrow_avx512(const uint8_t* rows, int64_t row_bytes, const int8_t* quotients, int count,
                                uint8_t* dst) {
  vertical_row_narrow(rows, row_bytes, quotients, count, dst);
}

#else

void horizontal_row_avx512(const uint8_t*, const HorizontalTables&, uint8_t*) {
  std::abort();
}

void vertical_row_narrow_avx512(const uint8_t*, int64_t, const int8_t*, int, uint8_t*) {
  std::abort();
}

#endif

}  // namespace m2ort
