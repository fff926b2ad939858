// Layer normalisation of bfloat16 rows: the torch backend's LayerNorm for a bf16 model on the CPU,
// where torch's own bf16 kernel runs at about 60% of its float32 rate (docs/backends.md).
#pragma once

#include <cstdint>
#include <vector>

#include "simd.hpp"

namespace m2ort {

// The kernels layer_norm_bf16 can run on this CPU, the one kAuto picks first: AVX-512 (F, BW, VL,
// DQ and FMA) where the CPU has it, then the scalar loop, which does the same float32 arithmetic
// in the same order (value j's sums in lane j % 32, then a fixed tree), so every kernel gives the
// same bits.
std::vector<CpuKernel> layer_norm_kernels();

// x (rows, width) bf16 bits, C-contiguous -> out, the same shape. Per row, in float32: the sums of
// d = x - x[0] and of d^2 (x[0] as a pivot keeps a row far from zero its variance's digits),
// mean = x[0] + sum(d) / width, var = sum(d^2) / width - (sum(d) / width)^2, rstd = 1 / sqrt(var +
// eps) (in double, as torch adds its double eps), y = (x * rstd + (-mean * rstd)) * weight + bias
// (two FMAs), rounded to nearest even (NaN -> 0x7FC0): torch's LayerNorm on bf16 rows, whose
// variance comes from Welford's update instead. One pass to read the row, one to write it.
// weight, bias: (width,) bf16 bits.
void layer_norm_bf16(const uint16_t* x, int64_t rows, int64_t width, const uint16_t* weight, const uint16_t* bias,
                     double eps, uint16_t* out, int64_t num_threads, CpuKernel kernel = CpuKernel::kAuto);

}  // namespace m2ort
