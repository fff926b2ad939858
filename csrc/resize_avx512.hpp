// resize.cpp's horizontal pass on AVX-512 VBMI, the same integer arithmetic 16 output bytes at a
// time: for each tap, one byte permute gathers the 16 input bytes (zero-extended to int32 lanes)
// from a 128-byte window of the row, one 32-bit multiply-add applies Pillow's 22-bit weights. The
// sums and their rounding are Pillow's, so the output is the scalar pass's bit for bit.
//
// Where the weights are narrow (narrow_quotients: a 2x or 4x shrink away from the edges), the same
// sums run in 16-bit lanes instead, two taps per multiply-add (vpmaddubsw): with w = q * 2^15,
// (sum w * p + 2^21) >> 22 == (sum q * p + 2^6) >> 7 exactly, and the quotients' sum <= 128 keeps
// every partial sum below 2^15. The horizontal pass does so for 32 output bytes whose taps fit
// one window (a 2x shrink's), the vertical pass (resize.cpp) for each row with narrow weights.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "resize.hpp"
#include "simd.hpp"

namespace m2ort {

constexpr int kNarrowShift = 15;

// One output's count weights as 8-bit quotients w / 2^kNarrowShift (written to quotients) where
// each is a non-negative multiple of 2^kNarrowShift and the quotients sum to at most 128; false
// otherwise (the edges' renormalised weights, shrinks by other factors).
bool narrow_quotients(const int32_t* weights, int count, int8_t* quotients);

// Per-row tables of one horizontal pass (the same for every row of every patch).
struct HorizontalTables {
  int ksize = 0;
  int64_t groups = 0;            // 16-byte groups of output bytes in a row
  int64_t row_bytes = 0;         // input row: in_width * 3
  int64_t out_bytes = 0;         // output row: out_width * 3
  std::vector<int64_t> window;   // groups: first input byte of each group's 128-byte window
  std::vector<uint8_t> index;    // groups x ksize x 64: byte k*4 of lane k = the window byte it takes
  std::vector<int32_t> weights;  // groups x ksize x 16
  // 32-byte blocks (block b: groups 2b and 2b + 1) whose 32 outputs all have narrow weights within
  // one 128-byte window run in 16-bit lanes, two taps (a pair: (ksize + 1) / 2 of them) per step:
  std::vector<uint8_t> narrow;                // blocks: 1 where the block runs narrow; empty: none does
  std::vector<int64_t> narrow_window;         // blocks: first input byte of the block's window
  std::vector<uint8_t> narrow_index;          // blocks x pairs x 64: bytes 2j, 2j + 1 = lane j's taps 2k, 2k + 1
  std::vector<int8_t> narrow_quotient_bytes;  // blocks x pairs x 64: their quotients
};

// The tables for taps (resize_taps(in_width, out_width)); nullopt where a group's taps span more
// than 128 input bytes (shrinks beyond ~4x), which the scalar pass handles.
std::optional<HorizontalTables> horizontal_tables(const ResizeTaps& taps, int64_t in_width, int64_t out_width);

// One row: src (in_width * 3 bytes) -> dst (out_width * 3 bytes). Only where avx512_vbmi_available().
void horizontal_row_avx512(const uint8_t* src, const HorizontalTables& tables, uint8_t* dst);

// One vertical output row of row_bytes from count input rows (rows, then every row_bytes) with
// narrow quotients (narrow_quotients). Only where avx512_vbmi_available().
void vertical_row_narrow_avx512(const uint8_t* rows, int64_t row_bytes, const int8_t* quotients, int count,
                                uint8_t* dst);

}  // namespace m2ort
