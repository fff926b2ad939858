#include "batch_avx512.hpp"

#include <algorithm>
#include <cstdlib>
#include <vector>

namespace m2ort {

#if defined(M2ORT_HAVE_AVX512_KERNELS)

namespace {

constexpr int kChunkPx = 64;  // pixels of one channel per step: one register of bytes

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

// 64 bytes at dst: straight to memory (no read for ownership) where streaming and dst is aligned.
M2ORT_AVX512_VBMI inline void store_line(uint8_t* dst, __m512i bytes, __mmask64 mask, bool streaming) {
  if (streaming && mask == ~__mmask64{0} && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), bytes);
  } else {
    _mm512_mask_storeu_epi8(dst, mask, bytes);
  }
}

// n (<= 64) values from their byte planes: 2- or 4-byte little-endian values at dst.
template <int ValueBytes>
M2ORT_AVX512_VBMI inline void store_values(const __m512i (&planes)[ValueBytes], const Indexes& ix, int64_t n,
                                           uint8_t* dst, bool streaming) {
  const __m512i to_words_low = _mm512_loadu_si512(ix.bytes_to_words[0]);
  const __m512i to_words_high = _mm512_loadu_si512(ix.bytes_to_words[1]);
  const __m512i words[2] = {_mm512_permutex2var_epi8(planes[0], to_words_low, planes[1]),
                            _mm512_permutex2var_epi8(planes[0], to_words_high, planes[1])};
  if constexpr (ValueBytes == 2) {
    for (int r = 0; r < 2; ++r) store_line(dst + 64 * r, words[r], first_bytes(2 * n - 64 * r), streaming);
  } else {
    const __m512i high_words[2] = {_mm512_permutex2var_epi8(planes[2], to_words_low, planes[3]),
                                   _mm512_permutex2var_epi8(planes[2], to_words_high, planes[3])};
    for (int r = 0; r < 4; ++r) {
      const __m512i to_dwords = _mm512_loadu_si512(ix.words_to_dwords[r % 2]);
      const __m512i dwords = _mm512_permutex2var_epi16(words[r / 2], to_dwords, high_words[r / 2]);
      store_line(dst + 64 * r, dwords, first_bytes(4 * n - 64 * r), streaming);
    }
  }
}

template <int ValueBytes>
M2ORT_AVX512_VBMI void assemble_rows(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height,
                                     int64_t width, const uint8_t (&tables)[3][ValueBytes][256], uint8_t* out,
                                     bool streaming) {
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
        store_values<ValueBytes>(planes, ix, n, dst + x * ValueBytes, streaming);
      }
    }
  }
  _mm_sfence();  // streaming stores, ordered before whatever hands the batch on
}

// The token layout keeps the pixels interleaved. A row of tokens is p runs of 3p bytes per token;
// they are copied in output order into a staging row (width * p * 3 bytes, in L1), whose bytes
// then become values 64 at a time: byte i of the staging row is channel i % 3, as every run starts
// on a pixel.
M2ORT_AVX512_VBMI inline void stage_token_row(const uint8_t* src, int64_t width, int64_t patch_px, uint8_t* staged) {
  const int64_t run_bytes = 3 * patch_px, row_bytes = 3 * width, grid_w = width / patch_px;
  const __mmask64 run_mask = first_bytes(run_bytes);
  for (int64_t gx = 0; gx < grid_w; ++gx) {
    for (int64_t p1 = 0; p1 < patch_px; ++p1, staged += run_bytes) {
      _mm512_mask_storeu_epi8(staged, run_mask,
                              _mm512_maskz_loadu_epi8(run_mask, src + p1 * row_bytes + gx * run_bytes));
    }
  }
}

// Each staged byte looked up in all three channels' tables, each lane keeping its channel's value.
template <int ValueBytes>
M2ORT_AVX512_VBMI void assemble_token_rows(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end,
                                           int64_t width, int64_t patch_px, const uint8_t (&tables)[3][ValueBytes][256],
                                           uint8_t* out, bool streaming) {
  const Indexes& ix = indexes();
  __m512i table[3][ValueBytes][4];
  for (int c = 0; c < 3; ++c) {
    for (int b = 0; b < ValueBytes; ++b) {
      for (int q = 0; q < 4; ++q) table[c][b][q] = _mm512_loadu_si512(tables[c][b] + 64 * q);
    }
  }
  // channel_lanes[phase][c]: the lanes j of 64 bytes from staging byte s (phase = s % 3) holding
  // channel c: (phase + j) % 3 == c.
  __mmask64 channel_lanes[3][3] = {};
  for (int phase = 0; phase < 3; ++phase) {
    for (int j = 0; j < 64; ++j) channel_lanes[phase][(phase + j) % 3] |= __mmask64{1} << j;
  }
  const int64_t staged_bytes = width * patch_px * 3;
  std::vector<uint8_t> staged(static_cast<size_t>(staged_bytes));
  for (int64_t grid_row = grid_row_begin; grid_row < grid_row_end; ++grid_row) {
    stage_token_row(patches + grid_row * staged_bytes, width, patch_px, staged.data());
    uint8_t* dst = out + grid_row * staged_bytes * ValueBytes;
    for (int64_t s = 0; s < staged_bytes; s += 64) {
      const int64_t n = std::min<int64_t>(64, staged_bytes - s);
      const __m512i index = _mm512_maskz_loadu_epi8(first_bytes(n), staged.data() + s);
      const __mmask64 top_bit = _mm512_movepi8_mask(index);
      const __mmask64(&lanes)[3] = channel_lanes[s % 3];
      __m512i planes[ValueBytes];
      for (int v = 0; v < ValueBytes; ++v) {
        planes[v] = lookup(index, top_bit, table[0][v]);
        planes[v] = _mm512_mask_blend_epi8(lanes[1], planes[v], lookup(index, top_bit, table[1][v]));
        planes[v] = _mm512_mask_blend_epi8(lanes[2], planes[v], lookup(index, top_bit, table[2][v]));
      }
      store_values<ValueBytes>(planes, ix, n, dst + s * ValueBytes, streaming);
    }
  }
  _mm_sfence();
}

// AffineBf16's coefficients per lane of 16 values: variant r's lane j holds channel (r + j) % 3.
struct AffineLanes {
  __m512 scale[3], shift[3];
};

M2ORT_AVX512_BF16 inline AffineLanes affine_lanes(const AffineBf16& affine) {
  AffineLanes lanes;
  for (int r = 0; r < 3; ++r) {
    float scale[16], shift[16];
    for (int j = 0; j < 16; ++j) {
      scale[j] = affine.scale[(r + j) % 3];
      shift[j] = affine.shift[(r + j) % 3];
    }
    lanes.scale[r] = _mm512_loadu_ps(scale);
    lanes.shift[r] = _mm512_loadu_ps(shift);
  }
  return lanes;
}

// 16 bf16 values of 16 staged bytes, the coefficients of variant r (AffineLanes).
M2ORT_AVX512_BF16 inline __m512 affine_values(__m128i bytes, const AffineLanes& lanes, int64_t variant) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), lanes.scale[variant], lanes.shift[variant]);
}

// n (<= 64) staged bytes, the first at phase (its staging offset % 3) -> n bf16 values at dst.
M2ORT_AVX512_BF16 inline void affine_chunk(const uint8_t* staged, int64_t n, int64_t phase, const AffineLanes& lanes,
                                           uint16_t* dst) {
  __m512 values[4];
  for (int k = 0; k < 4; ++k) {  // 16 = 1 (mod 3): the next 16 bytes start one phase on
    const __m128i bytes = _mm_maskz_loadu_epi8(static_cast<__mmask16>(first_bytes(n - 16 * k)), staged + 16 * k);
    values[k] = affine_values(bytes, lanes, (phase + k) % 3);
  }
  const __m512bh low = _mm512_cvtne2ps_pbh(values[1], values[0]), high = _mm512_cvtne2ps_pbh(values[3], values[2]);
  _mm512_mask_storeu_epi16(dst, static_cast<__mmask32>(first_bytes(n)), reinterpret_cast<const __m512i&>(low));
  _mm512_mask_storeu_epi16(dst + 32, static_cast<__mmask32>(first_bytes(n - 32)),
                           reinterpret_cast<const __m512i&>(high));
}

// 192 staged bytes (three phases of 64: the usual step, without masks or run-time phases).
M2ORT_AVX512_BF16 inline void affine_192(const uint8_t* staged, const AffineLanes& lanes, uint16_t* dst,
                                         bool streaming) {
  for (int half = 0; half < 6; ++half) {  // 32 values each; bytes 32 * half on: variant (2 * half) % 3
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(staged + 32 * half));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(staged + 32 * half + 16));
    const __m512bh values =
        _mm512_cvtne2ps_pbh(affine_values(b, lanes, (2 * half + 1) % 3), affine_values(a, lanes, (2 * half) % 3));
    store_line(reinterpret_cast<uint8_t*>(dst + 32 * half), reinterpret_cast<const __m512i&>(values), ~__mmask64{0},
               streaming);
  }
}

M2ORT_AVX512_BF16 void assemble_token_rows_affine(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end,
                                                  int64_t width, int64_t patch_px, const AffineBf16& affine,
                                                  uint16_t* out, bool streaming) {
  const AffineLanes lanes = affine_lanes(affine);
  const int64_t staged_bytes = width * patch_px * 3;
  std::vector<uint8_t> staged(static_cast<size_t>(staged_bytes));
  for (int64_t grid_row = grid_row_begin; grid_row < grid_row_end; ++grid_row) {
    stage_token_row(patches + grid_row * staged_bytes, width, patch_px, staged.data());
    uint16_t* dst = out + grid_row * staged_bytes;
    int64_t s = 0;
    for (; s + 192 <= staged_bytes; s += 192) affine_192(staged.data() + s, lanes, dst + s, streaming);
    for (; s < staged_bytes; s += 64) {
      affine_chunk(staged.data() + s, std::min<int64_t>(64, staged_bytes - s), s % 3, lanes, dst + s);
    }
  }
  _mm_sfence();
}

// Byte 3v + c of a staging row = v: every (channel, byte) pair once, through affine_chunk.
M2ORT_AVX512_BF16 bool affine_matches(const AffineBf16& affine, const uint16_t (&values)[3][256]) {
  uint8_t staged[3 * 256];
  uint16_t got[3 * 256];
  for (int v = 0; v < 256; ++v) {
    for (int c = 0; c < 3; ++c) staged[3 * v + c] = static_cast<uint8_t>(v);
  }
  const AffineLanes lanes = affine_lanes(affine);
  for (int64_t s = 0; s < 3 * 256; s += 64) affine_chunk(staged + s, 64, s % 3, lanes, got + s);
  for (int v = 0; v < 256; ++v) {
    for (int c = 0; c < 3; ++c) {
      if (got[3 * v + c] != values[c][v]) return false;
    }
  }
  return true;
}

}  // namespace

bool token_kernel_avx512_fits(int64_t patch_px) {
  return patch_px == 4 || patch_px == 8 || patch_px == 16;
}

bool affine_tokens_bf16_exact(const AffineBf16& affine, const uint16_t (&values)[3][256]) {
  return avx512_bf16_available() && affine_matches(affine, values);
}

void assemble_token_rows_affine_bf16(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end,
                                     int64_t width, int64_t patch_px, const AffineBf16& affine, uint16_t* out,
                                     bool streaming) {
  assemble_token_rows_affine(patches, grid_row_begin, grid_row_end, width, patch_px, affine, out, streaming);
}

void assemble_token_rows_avx512(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end, int64_t width,
                                int64_t patch_px, const uint8_t (&tables)[3][2][256], uint8_t* out, bool streaming) {
  assemble_token_rows<2>(patches, grid_row_begin, grid_row_end, width, patch_px, tables, out, streaming);
}

void assemble_token_rows_avx512(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end, int64_t width,
                                int64_t patch_px, const uint8_t (&tables)[3][4][256], uint8_t* out, bool streaming) {
  assemble_token_rows<4>(patches, grid_row_begin, grid_row_end, width, patch_px, tables, out, streaming);
}

void assemble_rows_avx512(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height, int64_t width,
                          const uint8_t (&tables)[3][2][256], uint8_t* out, bool streaming) {
  assemble_rows<2>(patches, row_begin, row_end, height, width, tables, out, streaming);
}

void assemble_rows_avx512(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height, int64_t width,
                          const uint8_t (&tables)[3][4][256], uint8_t* out, bool streaming) {
  assemble_rows<4>(patches, row_begin, row_end, height, width, tables, out, streaming);
}

#else

bool token_kernel_avx512_fits(int64_t) {
  return false;
}

bool affine_tokens_bf16_exact(const AffineBf16&, const uint16_t (&)[3][256]) {
  return false;
}

void assemble_token_rows_affine_bf16(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const AffineBf16&, uint16_t*,
                                     bool) {
  std::abort();
}

void assemble_token_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][2][256],
                                uint8_t*, bool) {
  std::abort();
}

void assemble_token_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][4][256],
                                uint8_t*, bool) {
  std::abort();
}

void assemble_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][2][256], uint8_t*,
                          bool) {
  std::abort();
}

void assemble_rows_avx512(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const uint8_t (&)[3][4][256], uint8_t*,
                          bool) {
  std::abort();
}

#endif

}  // namespace m2ort
