// A minimal static-partition parallel_for on std::thread.
//
// The batch kernels are memory-bound loops over independent rows, so contiguous equal chunks
// (one per thread) balance well and need no work queue.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace m2ort {

// Number of threads to use for `units` independent work items.
// requested > 0: that many (at most one per unit). requested == 0: one per hardware thread, but
// none with fewer than `min_units_per_thread` items, so that tiny batches do not pay thread start-up.
inline int64_t choose_threads(int64_t units, int64_t requested, int64_t min_units_per_thread) {
  if (units <= 0) return 1;
  int64_t threads = requested;
  if (threads <= 0) {
    const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
    threads = std::min(hardware, std::max<int64_t>(1, units / std::max<int64_t>(1, min_units_per_thread)));
  }
  return std::max<int64_t>(1, std::min(threads, units));
}

// Calls fn(begin, end) on `threads` contiguous chunks of [0, units); chunk 0 runs on the calling
// thread. fn must not throw (the kernels using this only read and write memory).
template <typename Fn>
void parallel_for(int64_t units, int64_t threads, Fn&& fn) {
  if (units <= 0) return;
  threads = std::max<int64_t>(1, std::min(threads, units));
  if (threads == 1) {
    fn(int64_t{0}, units);
    return;
  }
  auto chunk_begin = [&](int64_t t) { return units * t / threads; };
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  for (int64_t t = 1; t < threads; ++t) {
    workers.emplace_back([&fn, begin = chunk_begin(t), end = chunk_begin(t + 1)] { fn(begin, end); });
  }
  fn(chunk_begin(0), chunk_begin(1));
  for (auto& worker : workers) worker.join();
}

}  // namespace m2ort
