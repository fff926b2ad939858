// Batch assembly kernels: plain C++ on raw pointers, no Python (module.cpp validates and binds).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "simd.hpp"

namespace m2ort {

// The kernels assemble_batch and assemble_batch_bf16 can run on this CPU for a layout (patch_px
// 0: planes; > 0: tokens), the one kAuto picks first (float32 tokens excepted: kAuto runs the
// scalar loop there, faster than the lookups): for tokens of 4, 8 or 16 px, AVX-512 BF16 (bf16
// output computed as one FMA per value, where that gives the table's bits for the call's mean and
// std; else, and for float32, VBMI's lookups); AVX-512 VBMI (batch_avx512.hpp) where the CPU has
// it, for planes and those tokens; then the scalar loop.
std::vector<CpuKernel> assemble_kernels(int64_t patch_px = 0);

// True where assemble_batch_bf16's AVX-512 BF16 kernel computes tokens for this mean and std (its
// FMA gives the table's bits for every byte of every channel, and the CPU has the kernel); false
// where it falls back to the lookups.
bool affine_bf16_runs(const std::array<double, 3>& mean, const std::array<double, 3>& std_dev);

// patches (N, H, W, 3) uint8, C-contiguous -> out, C-contiguous, out = (patches / 255 - mean[c]) / std[c]:
// - patch_px 0: planes (N, 3, H, W);
// - patch_px p > 0 (dividing H and W): tokens (N, (H/p) * (W/p), p * p * 3), the grid's p x p
//   squares in row-major order, each flattened (p1 p2 c): model.patchify's layout, so that a model
//   taking tokens skips its copies.
void assemble_batch(const uint8_t* patches, int64_t n, int64_t height, int64_t width, int64_t patch_px,
                    const std::array<double, 3>& mean, const std::array<double, 3>& std_dev, float* out,
                    int64_t num_threads, CpuKernel kernel = CpuKernel::kAuto);

// The same values rounded to bfloat16 (round to nearest even, as torch's float32 -> bfloat16 cast),
// written as their 16-bit patterns: what a bf16 model's first cast of the float32 batch gives.
void assemble_batch_bf16(const uint8_t* patches, int64_t n, int64_t height, int64_t width, int64_t patch_px,
                         const std::array<double, 3>& mean, const std::array<double, 3>& std_dev, uint16_t* out,
                         int64_t num_threads, CpuKernel kernel = CpuKernel::kAuto);

// Crops n square patches of size_px from an RGB region and writes them to out (n, size, size, 3)
// uint8, C-contiguous. The region is (H, W, 3) uint8 addressed through byte strides (so an RGBA
// buffer's [..., :3] view works without a copy). origins_xy (n, 2) int64 holds each patch's
// top-left (x, y) in region pixels; pixels falling outside the region are white (255).
struct RegionView {
  const uint8_t* data;
  int64_t height, width;
  int64_t row_stride, pixel_stride, channel_stride;  // bytes
};

void crop_patches(const RegionView& region, const int64_t* origins_xy, int64_t n, int64_t size_px, uint8_t* out,
                  int64_t num_threads);

}  // namespace m2ort
