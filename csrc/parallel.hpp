// A minimal static-partition parallel_for on std::thread.
//
// The batch kernels are memory-bound loops over independent rows, so contiguous equal chunks
// (one per thread) balance well and need no work queue.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace m2ort {

// CPUs this process may run on: the size of its affinity mask (taskset, cgroup cpusets, a
// container's --cpuset-cpus), which is what the kernel will schedule our threads on.
// std::thread::hardware_concurrency() counts the host's CPUs instead, so in a container it
// would start one thread per host core on a machine slice of two. Falls back to it where there
// is no affinity mask to read (not Linux, or a mask wider than cpu_set_t's 1024 CPUs).
inline int64_t available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int count = CPU_COUNT(&set);
    if (count > 0) return count;
  }
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// Number of threads to use for `units` independent work items.
// requested > 0: that many (at most one per unit). requested == 0: one per CPU in the process's
// affinity mask (available_cpus), but none with fewer than `min_units_per_thread` items, so that
// tiny batches do not pay thread start-up.
inline int64_t choose_threads(int64_t units, int64_t requested, int64_t min_units_per_thread) {
  if (units <= 0) return 1;
  int64_t threads = requested;
  if (threads <= 0) {
    threads = std::min(available_cpus(), std::max<int64_t>(1, units / std::max<int64_t>(1, min_units_per_thread)));
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
  auto chunk_begin = [&](int64_t t) {
    return units * t / threads;
  };
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads - 1));
  for (int64_t t = 1; t < threads; ++t) {
    workers.emplace_back([&fn, begin = chunk_begin(t), end = chunk_begin(t + 1)] { fn(begin, end); });
  }
  fn(chunk_begin(0), chunk_begin(1));
  for (auto& worker : workers) worker.join();
}

}  // namespace m2ort
