// batch.cpp's table lookups on AVX-512 VBMI, 64 pixels of one channel at a time: two byte
// permutes pull the channel out of 192 interleaved RGB bytes; each byte of the output values
// is looked up in its own 256-byte table (two two-register permutes, blended on the index's top
// bit); byte permutes interleave those bytes into the values. The tables are batch.cpp's, so the
// output is the scalar loop's bit for bit.
#pragma once

#include <cstdint>

#include "simd.hpp"

namespace m2ort {

// Rows [row_begin, row_end) of patches (N, height, width, 3) uint8 -> out (N, 3, height, width)
// of 2-byte (bf16 bits) or 4-byte (float32) little-endian values. tables[c][b][v]: byte b of
// channel c's value for input byte v. Only where avx512_vbmi_available(). streaming (every
// kernel here): whole 64-byte-aligned lines of out go straight to memory (non-temporal stores, no
// read for ownership first), for outputs too large to stay in the caches until they are read.
void assemble_rows_avx512(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height, int64_t width,
                          const uint8_t (&tables)[3][2][256], uint8_t* out, bool streaming);
void assemble_rows_avx512(const uint8_t* patches, int64_t row_begin, int64_t row_end, int64_t height, int64_t width,
                          const uint8_t (&tables)[3][4][256], uint8_t* out, bool streaming);

// Token rows [grid_row_begin, grid_row_end) (one per patch and grid row) of patches (N, height,
// width, 3) uint8 -> out (N, T, p * p * 3) of the same values (batch.hpp's token layout), 64
// interleaved bytes at a time; only where token_kernel_avx512_fits(patch_px) (p = 4, 8, 16) and
// avx512_vbmi_available().
bool token_kernel_avx512_fits(int64_t patch_px);
void assemble_token_rows_avx512(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end, int64_t width,
                                int64_t patch_px, const uint8_t (&tables)[3][2][256], uint8_t* out, bool streaming);
void assemble_token_rows_avx512(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end, int64_t width,
                                int64_t patch_px, const uint8_t (&tables)[3][4][256], uint8_t* out, bool streaming);

// bfloat16 values as arithmetic: channel c's value for byte v is bf16(fma(v, scale[c], shift[c]))
// (float32 FMA, then the hardware's round to nearest even), 16 values per instruction instead of
// six table lookups per 64. Used only where affine_tokens_bf16_exact says that gives the tables'
// bits for every byte of every channel.
struct AffineBf16 {
  float scale[3], shift[3];
};

// True where the affine kernel, run on all 256 bytes of each channel, gives values[c][v] (bf16
// bits) exactly; false also where avx512_bf16_available() is not.
bool affine_tokens_bf16_exact(const AffineBf16& affine, const uint16_t (&values)[3][256]);

// assemble_token_rows_avx512's rows and layout, the values from affine (affine_tokens_bf16_exact).
void assemble_token_rows_affine_bf16(const uint8_t* patches, int64_t grid_row_begin, int64_t grid_row_end,
                                     int64_t width, int64_t patch_px, const AffineBf16& affine, uint16_t* out,
                                     bool streaming);

}  // namespace m2ort
