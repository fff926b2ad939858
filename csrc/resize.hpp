// Antialiased bilinear resize of RGB patches, equal bit for bit to the package's reference resize
// (m2ort_fast.slide.resize_rgb: Pillow's Image.resize(size, BILINEAR, reducing_gap=None)).
#pragma once

#include <cstdint>
#include <vector>

#include "simd.hpp"

namespace m2ort {

// Pillow's fixed point: weights are integers scaled by 2^kResizePrecisionBits.
constexpr int kResizePrecisionBits = 22;

// One axis of a resize in_size -> out_size, Pillow's weights with each output's taps moved into a
// window of one length (ksize) inside the input, zero weights filling the rest:
//   out[i] = clip((sum_k weights[i * ksize + k] * in[first[i] + k] + 2^21) >> 22, 0, 255)
// in_size == out_size gives the identity (one tap of weight 2^22). What a device kernel needs to
// resize bit for bit as resize_patches does (horizontal pass rounded to uint8, then vertical).
struct ResizeTaps {
  int ksize = 0;
  std::vector<int32_t> first, weights;  // first: out_size; weights: out_size x ksize
};
ResizeTaps resize_taps(int in_size, int out_size);

// The kernels that can run resize_patches in_width -> out_width on this CPU, the one kAuto picks
// first: AVX-512 VBMI (both passes; resize_avx512.hpp) where the CPU has it and the shrink is at
// most ~4x, then the scalar loops.
std::vector<CpuKernel> resize_kernels(int64_t in_width, int64_t out_width);

// patches (N, in_height, in_width, 3) uint8, C-contiguous -> out (N, out_height, out_width, 3)
// uint8, C-contiguous. The same arithmetic as Pillow's 8-bit resampler (libImaging/Resample.c):
// per-axis triangle filter widened by the shrink factor, weights normalised in double and rounded
// to 22-bit fixed point, a horizontal pass rounded to uint8, then a vertical pass. Pillow orders
// the passes by cost, horizontal first on a tie: bit-exact for square patches (the caller checks). Where Pillow
// spends its time on one image at a time (RGB padded to 4 bytes, a Python call per patch), this
// computes the weights once per batch and splits the patches over threads.
void resize_patches(const uint8_t* patches, int64_t n, int64_t in_height, int64_t in_width, int64_t out_height,
                    int64_t out_width, uint8_t* out, int64_t num_threads, CpuKernel kernel = CpuKernel::kAuto);

}  // namespace m2ort
