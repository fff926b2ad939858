// bfloat16 <-> float32 on bit patterns, as torch converts them (c10::BFloat16): the batch tables
// (batch.cpp) and the LayerNorm kernel (layer_norm.cpp) round alike.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace m2ort {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// Round to nearest even; NaN -> 0x7FC0.
inline uint16_t float_to_bf16(float value) {
  if (std::isnan(value)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace m2ort
