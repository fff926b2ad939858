// What the AVX-512 kernels (resize_avx512.cpp, batch_avx512.cpp, layer_norm.cpp) share: the CPU check, the
// target attribute they are compiled with (the rest of the extension stays baseline x86-64, so the
// same build runs on every CPU), and byte masks for a row's ragged end. Elsewhere, or built with
// -DM2ORT_NO_AVX512, only the scalar kernels exist.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(M2ORT_NO_AVX512)
#define M2ORT_HAVE_AVX512_KERNELS 1
#include <immintrin.h>
#define M2ORT_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))
#define M2ORT_AVX512_BW __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define M2ORT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))
#endif

namespace m2ort {

// Which code a kernel with several runs: kAuto, the fastest this CPU has. All give the same bytes.
enum class CpuKernel { kAuto, kScalar, kAvx512Vbmi, kAvx512Bw, kAvx512Bf16 };

// True where this CPU (and its OS: GCC's and clang's checks include XCR0) runs AVX-512 VBMI code.
inline bool avx512_vbmi_available() {
#if defined(M2ORT_HAVE_AVX512_KERNELS)
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
  return available;
#else
  return false;
#endif
}

// True where this CPU runs AVX-512 F/BW/VL/DQ code (with FMA): every AVX-512 CPU since Skylake-SP.
inline bool avx512_bw_available() {
#if defined(M2ORT_HAVE_AVX512_KERNELS)
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("fma");
  return available;
#else
  return false;
#endif
}

// True where this CPU runs AVX-512 VBMI code with the BF16 conversions (Sapphire Rapids, Zen 4 on).
inline bool avx512_bf16_available() {
#if defined(M2ORT_HAVE_AVX512_KERNELS)
  static const bool available = avx512_vbmi_available() && __builtin_cpu_supports("avx512bf16");
  return available;
#else
  return false;
#endif
}

#if defined(M2ORT_HAVE_AVX512_KERNELS)
// The first `count` of a register's 64 bytes (none for count <= 0, all for count >= 64): masked
// loads neither read nor fault past a row's end, masked stores write only its bytes.
M2ORT_AVX512_VBMI inline __mmask64 first_bytes(int64_t count) {
  return count >= 64 ? ~__mmask64{0} : count <= 0 ? __mmask64{0} : (__mmask64{1} << count) - 1;
}
#endif

}  // namespace m2ort
