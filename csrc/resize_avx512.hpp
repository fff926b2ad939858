// resize.cpp's horizontal pass on AVX-512 VBMI, the same integer arithmetic 16 output bytes at a
// time: for each tap, one byte permute gathers the 16 input bytes (zero-extended to int32 lanes)
// from a 128-byte window of the row, one 32-bit multiply-add applies Pillow's 22-bit weights. The
// sums and their rounding are Pillow's, so the output is the scalar pass's bit for bit.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "resize.hpp"
#include "simd.hpp"

namespace m2ort {

// Per-row tables of one horizontal pass (the same for every row of every patch).
struct HorizontalTables {
  int ksize = 0;
  int64_t groups = 0;            // 16-byte groups of output bytes in a row
  int64_t row_bytes = 0;         // input row: in_width * 3
  int64_t out_bytes = 0;         // output row: out_width * 3
  std::vector<int64_t> window;   // groups: first input byte of each group's 128-byte window
  std::vector<uint8_t> index;    // groups x ksize x 64: byte k*4 of lane k = the window byte it takes
  std::vector<int32_t> weights;  // groups x ksize x 16
};

// The tables for taps (resize_taps(in_width, out_width)); nullopt where a group's taps span more
// than 128 input bytes (shrinks beyond ~4x), which the scalar pass handles.
std::optional<HorizontalTables> horizontal_tables(const ResizeTaps& taps, int64_t in_width, int64_t out_width);

// One row: src (in_width * 3 bytes) -> dst (out_width * 3 bytes). Only where avx512_vbmi_available().
void horizontal_row_avx512(const uint8_t* src, const HorizontalTables& tables, uint8_t* dst);

}  // namespace m2ort
