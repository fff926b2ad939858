#include "batch_avx512.hpp"

#include <algorithm>
#include <cstdlib>

namespace m2ort {

#if defined(M2ORT_HAVE_AVX512_KERNELS)

namespace {

constexpr int kChunkPx = 64;      // pixels of one channel per step: one register of bytes
constexpr int kTokenStepPx = 16;  // interleaved pixels per step of the token layout: 48 of the 64 bytes

// The permutes' index vectors, the same for every call.
struct Indexes {
  uint8_t channel_ab[3][64];        // pixel j's byte 3j + c, from the chunk's first 128 bytes
  uint8_t channel_c[3][64];         // ... and 3j + c - 128, from its last 64
  __mmask64 from_c[3];              // the pixels whose byte is in the last 64
  uint8_t bytes_to_words[2][64];    // (P0, P1) -> words P0[k] | P1[k] << 8: k < 32, then k >= 32
  uint16_t words_to_dwords[2][32];  // (W01, W23) -> dwords W01[k] | W23[k] << 16: k < 16, then k >= 16

  Indexes() {
    for (int c = 0; c < 3; ++c) {
      from_c[c] = 0;
      for (int j = 0; j < 64; ++j) {
        const int byte = 3 * j + c;
        channel_ab[c][j] = static_cast<uint8_t>(byte < 128 ? byte : 0);
        channel_c[c][j] = static_cast<uint8_t>(byte >= 128 ? byte - 128 : 0);
        if (byte >= 128) from_c[c] |= __mmask64{1} << j;
      }
    }
    for (int half = 0; half < 2; ++half) {
      for (int k = 0; k < 32; ++k) {
        bytes_to_words[half][2 * k] = static_cast<uint8_t>(32 * half + k);
        bytes_to_words[half][2 * k + 1] = static_cast<uint8_t>(64 + 32 * half + k);
      }
      for (int k = 0; k < 16; ++k) {
        words_to_dwords[half][2 * k] = static_cast<uint16_t>(16 * half + k);
        words_to_dwords[half][2 * k + 1] = static_cast<uint16_t>(32 + 16 * half + k);
      }
    }
  }
};

const Indexes& indexes() {
  static const Indexes built;
  return built;
}

// table[v] for 64 byte indexes v: a 256-byte table is four registers, a two-register permute
// covers half of it (the index's low 7 bits), the top bit picks the half.
M2ORT_AVX512_VBMI inline __m512i lookup(__m512i index, __mmask64 top_bit, const __m512i (&table)[4]) {
  const __m512i low = _mm512_permutex2var_epi8(table[0], index, table[1]);
  const __m512i high = _mm512_permutex2var_epi8(table[2], index, table[3]);
  return _mm512_mask_blend_epi8(top_bit, low, high);
}

// n (<= 64) values from their byte planes: 2- or 4-byte little-endian values at dst.
template <int ValueBytes>
M2ORT_AVX512_VBMI inline void store_values(const __m512i (&planes)[ValueBytes], const Indexes& ix, int64_t n,
                                           uint8_t* dst) {
  const __m512i to_words_low = _mm512_loadu_si512(ix.bytes_to_words[0]);
  const __m512i to_words_high = _mm512_loadu_si512(ix.bytes_to_words[1]);
  const __m512i words[2] = {_mm512_permutex2var_epi8(planes[0], to_words_low, planes[1]),
                            _mm512_permutex2var_epi8(planes[0], to_words_high, planes[1])};
  if constexpr (ValueBytes == 2) {
    for (int r = 0; r < 2; ++r) _mm512_mask_storeu_epi8(dst + 64 * r, first_bytes(2 * n - 64 * r), words[r]);
  } else {
    const __m512i high_words[2] = {_mm512_permutex2var_epi8(planes[2], to_words_low, planes[3]),
                                   _mm512_permutex2var_epi8(planes[2], to_words_high, planes[3])};
    for (int r = 0; r < 4; ++r) {
      const __m512i to_dwords = _mm512_loadu_si512(ix.words_to_dwords[r % 2]);
      const __m512i dwords = _mm512_permutex2var_epi16(words[r / 2], to_dwords, high_words[r / 2]);
      _mm512_mask_storeu_epi8(dst + 64 * r, first_bytes(4 * n - 64 * r), dwords);
    }
  }
}

template <int ValueBytes>
M2ORT_AVX512_VBMI void assemble_rows(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height,
                                     int64_t width, const uint8_t (&tables)[3][ValueBytes][256], uint8_t* out) {
  const Indexes& ix = indexes();
  const int64_t plane = height * width;
  for (int c = 0; c < 3; ++c) {  // one channel's tables held in registers over all the rows
    __m512i table[ValueBytes][4];
    for (int b = 0; b < ValueBytes; ++b) {
      for (int q = 0; q < 4; ++q) table[b][q] = _mm512_loadu_si512(tables[c][b] + 64 * q);
    }
    const __m512i channel_ab = _mm512_loadu_si512(ix.channel_ab[c]);
    const __m512i channel_c = _mm512_loadu_si512(ix.channel_c[c]);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t i = row / height, y = row % height;
      const uint8_t* src = patches + row * width * 3;
      uint8_t* dst = out + ((i * 3 + c) * plane + y * width) * ValueBytes;
      for (int64_t x = 0; x < width; x += kChunkPx) {
        const int64_t n = std::min<int64_t>(kChunkPx, width - x), bytes = 3 * n;
        const uint8_t* chunk = src + 3 * x;
        const __m512i a = _mm512_maskz_loadu_epi8(first_bytes(bytes), chunk);
        const __m512i b = _mm512_maskz_loadu_epi8(first_bytes(bytes - 64), chunk + 64);
        const __m512i rest = _mm512_maskz_loadu_epi8(first_bytes(bytes - 128), chunk + 128);
        __m512i index = _mm512_permutex2var_epi8(a, channel_ab, b);
        index = _mm512_mask_permutexvar_epi8(index, ix.from_c[c], channel_c, rest);
        const __mmask64 top_bit = _mm512_movepi8_mask(index);
        __m512i planes[ValueBytes];
        for (int v = 0; v < ValueBytes; ++v) planes[v] = lookup(index, top_bit, table[v]);
        store_values<ValueBytes>(planes, ix, n, dst + x * ValueBytes);
      }
    }
  }
}

// The token layout keeps the pixels interleaved: 16 pixels (48 bytes, from 16 / p rows of one
// token) per step, each byte looked up in all three channels' tables and the lanes of its channel kept.
template <int ValueBytes>
M2ORT_AVX512_VBMI void assemble_token_rows(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end,
                                           int64_t width, int64_t patch_px, const uint8_t (&tables)[3][ValueBytes][256],
                                           uint8_t* out) {
  const Indexes& ix = indexes();
  __m512i table[3][ValueBytes][4];
  for (int c = 0; c < 3; ++c) {
    for (int b = 0; b < ValueBytes; ++b) {
      for (int q = 0; q < 4; ++q) table[c][b][q] = _mm512_loadu_si512(tables[c][b] + 64 * q);
    }
  }
  __mmask64 channel_lanes[3] = {0, 0, 0};
  for (int k = 0; k < 3 * kTokenStepPx; ++k) channel_lanes[k % 3] |= __mmask64{1} << k;
  const int64_t run_bytes = 3 * patch_px, runs = kTokenStepPx / patch_px, row_bytes = 3 * width;
  const int64_t grid_w = width / patch_px, steps_per_token = patch_px / runs;
  for (int64_t grid_row = grid_row_begin; grid_row < grid_row_end; ++grid_row) {
    const uint8_t* src = patches + grid_row * patch_px * row_bytes;
    uint8_t* dst = out + grid_row * grid_w * patch_px * run_bytes * ValueBytes;
    for (int64_t gx = 0; gx < grid_w; ++gx) {
      for (int64_t step = 0; step < steps_per_token; ++step, dst += 3 * kTokenStepPx * ValueBytes) {
        const uint8_t* run = src + step * runs * row_bytes + gx * run_bytes;
        __m512i index = _mm512_maskz_loadu_epi8(first_bytes(run_bytes), run);
        for (int64_t r = 1; r < runs; ++r) {  // run r at lanes [r * run_bytes, (r + 1) * run_bytes)
          const __mmask64 lanes = first_bytes((r + 1) * run_bytes) & ~first_bytes(r * run_bytes);
          index = _mm512_mask_loadu_epi8(index, lanes, run + r * row_bytes - r * run_bytes);
        }
        const __mmask64 top_bit = _mm512_movepi8_mask(index);
        __m512i planes[ValueBytes];
        for (int v = 0; v < ValueBytes; ++v) {
          planes[v] = lookup(index, top_bit, table[0][v]);
          planes[v] = _mm512_mask_blend_epi8(channel_lanes[1], planes[v], lookup(index, top_bit, table[1][v]));
          planes[v] = _mm512_mask_blend_epi8(channel_lanes[2], planes[v], lookup(index, top_bit, table[2][v]));
        }
        store_values<ValueBytes>(planes, ix, 3 * kTokenStepPx, dst);
      }
    }
  }
}

}  // namespace

bool token_kernel_avx512_fits(int64_t patch_px) {
  return patch_px == 4 || patch_px == 8 || patch_px == 16;
}

void assemble_token_rows_avx512(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end, int64_t width,
                                int64_t patch_px, const uint8_t (&tables)[3][2][256], uint8_t* out) {
  assemble_token_rows<2>(patches, grid_row_begin, grid_row_end, width, patch_px, tables, out);
}

void assemble_token_rows_avx512(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end, int64_t width,
                                int64_t patch_px, const uint8_t (&tables)[3][4][256], uint8_t* out) {
  assemble_token_rows<4>(patches, grid_row_begin, grid_row_end, width, patch_px, tables, out);
}

void assemble_rows_avx512(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height, int64_t width,
                          const uint8_t (&tables)[3][2][256], uint8_t* out) {
  assemble_rows<2>(patches, row_begin, row_end, height, width, tables, out);
}

void assemble_rows_avx512(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height, int64_t width,
                          const uint8_t (&tables)[3][4][256], uint8_t* out) {
  assemble_rows<4>(patches, row_begin, row_end, height, width, tables, out);
}

#else

bool token_kernel_avx512_fits(int64_t) {
  return false;
}

void assemble_token_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][2][256],
                                uint8_t*) {
  std::abort();
}

void assemble_token_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][4][256],
                                uint8_t*) {
  std::abort();
}

void assemble_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][2][256], uint8_t*) {
  std::abort();
}

void assemble_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][4][256], uint8_t*) {
  std::abort();
}

#endif

}  // namespace m2ort
