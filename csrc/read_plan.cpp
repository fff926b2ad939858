#include "read_plan.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace m2ort {

namespace {

constexpr int64_t kBytesPerPixel = 3;  // windows hold RGB uint8

int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
int64_t ceil_div(int64_t a, int64_t b) {
  return -floor_div(-a, b);
}
int64_t clamp(int64_t v, int64_t lo, int64_t hi) {
  return std::min(std::max(v, lo), hi);
}

struct Inputs {
  const double* centers;
  int64_t n;
  const std::vector<PlanSource>& sources;
  const std::vector<PlanPatchSet>& sets;
  std::vector<std::vector<int64_t>> sets_of_source;  // patch-set indices per source
  std::vector<int64_t> limit_rows;                   // most rows a step may ask of each source
};

int64_t top_y(const PlanPatchSet& set, int64_t spot) {
  return set.top_left_xy[2 * spot + 1];
}
int64_t left_x(const PlanPatchSet& set, int64_t spot) {
  return set.top_left_xy[2 * spot];
}

// Rows of `source` that spots [begin, end) of `order` need, tile-aligned and clipped to the
// level: [keep_from, bottom). Relies on each patch set's top y being non-decreasing in order.
std::pair<int64_t, int64_t> rows_needed(const Inputs& in, int64_t source, const std::vector<int64_t>& order,
                                        int64_t begin, int64_t end) {
  const PlanSource& src = in.sources[source];
  int64_t top = INT64_MAX, bottom = INT64_MIN;
  for (int64_t s : in.sets_of_source[source]) {
    const PlanPatchSet& set = in.sets[s];
    top = std::min(top, top_y(set, order[begin]));
    bottom = std::max(bottom, top_y(set, order[end - 1]) + set.read_px);
  }
  const int64_t keep_from = clamp(floor_div(top, src.tile_height_px) * src.tile_height_px, 0, src.height_px);
  const int64_t needed = clamp(ceil_div(bottom, src.tile_height_px) * src.tile_height_px, 0, src.height_px);
  return {keep_from, std::max(keep_from, needed)};
}

int64_t tiles_in(const PlanSource& src, int64_t x0, int64_t x1, int64_t y0, int64_t y1) {
  if (x1 <= x0 || y1 <= y0) return 0;
  return (ceil_div(x1, src.tile_width_px) - floor_div(x0, src.tile_width_px)) *
         (ceil_div(y1, src.tile_height_px) - floor_div(y0, src.tile_height_px));
}

ReadPlan plan_with_stripes(const Inputs& in, int64_t n_stripes, int64_t max_step_spots, int64_t reads_in_flight) {
  const int64_t n_src = static_cast<int64_t>(in.sources.size());
  ReadPlan plan;
  plan.n_sources = n_src;

  // Stripes: equal slices of the centres' x extent.
  double x_min = INFINITY, x_max = -INFINITY;
  for (int64_t i = 0; i < in.n; ++i) {
    x_min = std::min(x_min, in.centers[2 * i]);
    x_max = std::max(x_max, in.centers[2 * i]);
  }
  const double extent = std::max(x_max - x_min, 1e-9);
  std::vector<int64_t> stripe(in.n, 0);
  for (int64_t i = 0; i < in.n && n_stripes > 1; ++i) {
    const auto s = static_cast<int64_t>(std::floor((in.centers[2 * i] - x_min) / extent * n_stripes));
    stripe[i] = clamp(s, 0, n_stripes - 1);
  }
  plan.order.resize(in.n);
  std::iota(plan.order.begin(), plan.order.end(), int64_t{0});
  std::stable_sort(plan.order.begin(), plan.order.end(), [&](int64_t a, int64_t b) {
    if (stripe[a] != stripe[b]) return stripe[a] < stripe[b];
    if (in.centers[2 * a + 1] != in.centers[2 * b + 1]) return in.centers[2 * a + 1] < in.centers[2 * b + 1];
    return in.centers[2 * a] < in.centers[2 * b];
  });

  int64_t max_step_read_bytes = 0, peak_window_bytes = 0;
  int64_t begin = 0;
  while (begin < in.n) {
    const int64_t stripe_id = stripe[plan.order[begin]];
    int64_t end = begin;
    while (end < in.n && stripe[plan.order[end]] == stripe_id) ++end;
    const int64_t stripe_index = static_cast<int64_t>(plan.stripe_rows.size()) / std::max<int64_t>(n_src, 1);

    // The stripe's tile-aligned columns per source.
    std::vector<int64_t> x0(n_src), x1(n_src);
    for (int64_t src = 0; src < n_src; ++src) {
      const PlanSource& source = in.sources[src];
      int64_t lo = INT64_MAX, hi = INT64_MIN;
      for (int64_t s : in.sets_of_source[src]) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t spot = plan.order[k];
          lo = std::min(lo, left_x(in.sets[s], spot));
          hi = std::max(hi, left_x(in.sets[s], spot) + in.sets[s].read_px);
          if (k > begin && top_y(in.sets[s], spot) < top_y(in.sets[s], plan.order[k - 1])) {
            throw std::invalid_argument("top-left y of patch set " + std::to_string(s) +
                                        " decreases as the centres' y increases (inconsistent top_left_px)");
          }
        }
      }
      x0[src] = clamp(floor_div(lo, source.tile_width_px) * source.tile_width_px, 0, source.width_px);
      x1[src] = std::max(x0[src], clamp(ceil_div(hi, source.tile_width_px) * source.tile_width_px, 0, source.width_px));
      plan.stripe_columns.push_back(x0[src]);
      plan.stripe_columns.push_back(x1[src]);
    }

    // Steps: consecutive spots while every window stays within its row limit.
    std::vector<int64_t> bottom(n_src, -1), most_rows(n_src, 0);
    int64_t i = begin;
    while (i < end) {
      int64_t j = i + 1;
      while (j < end && j - i < max_step_spots) {
        bool fits = true;
        for (int64_t src = 0; src < n_src && fits; ++src) {
          const auto rows = rows_needed(in, src, plan.order, i, j + 1);
          fits = rows.second - rows.first <= in.limit_rows[src];
        }
        if (!fits) break;
        ++j;
      }
      int64_t step_read_bytes = 0;
      for (int64_t src = 0; src < n_src; ++src) {
        const auto rows = rows_needed(in, src, plan.order, i, j);
        const int64_t keep_from = rows.first;
        if (bottom[src] < keep_from) bottom[src] = keep_from;  // rows skipped over are never read
        int64_t read_y0 = bottom[src], read_y1 = std::max(bottom[src], rows.second);
        if (x1[src] == x0[src]) read_y1 = read_y0;  // every patch lies beside the level: nothing to read
        bottom[src] = read_y1;
        plan.step_rows.insert(plan.step_rows.end(), {keep_from, read_y0, read_y1});
        most_rows[src] = std::max(most_rows[src], read_y1 - keep_from);
        plan.tiles_decoded += tiles_in(in.sources[src], x0[src], x1[src], read_y0, read_y1);
        step_read_bytes += (read_y1 - read_y0) * (x1[src] - x0[src]) * kBytesPerPixel;
      }
      max_step_read_bytes = std::max(max_step_read_bytes, step_read_bytes);
      plan.step_stripe.push_back(stripe_index);
      plan.step_offsets.push_back(i);
      i = j;
    }
    int64_t window_bytes = 0;
    for (int64_t src = 0; src < n_src; ++src) {
      plan.stripe_rows.push_back(most_rows[src]);
      // The engine keeps each window in a buffer of twice its rows, so that appending never
      // needs a temporary copy (see stream.py).
      window_bytes += 2 * most_rows[src] * (x1[src] - x0[src]) * kBytesPerPixel;
    }
    peak_window_bytes = std::max(peak_window_bytes, window_bytes);
    begin = end;
  }
  plan.step_offsets.push_back(in.n);
  plan.peak_bytes = peak_window_bytes + reads_in_flight * max_step_read_bytes;
  return plan;
}

// Distinct tiles any patch touches, and the sum over patches (what one read per patch decodes
// without a tile cache).
void count_needed_tiles(const Inputs& in, ReadPlan& plan) {
  for (size_t src = 0; src < in.sources.size(); ++src) {
    const PlanSource& source = in.sources[src];
    const int64_t cols = ceil_div(source.width_px, source.tile_width_px);
    const int64_t rows = ceil_div(source.height_px, source.tile_height_px);
    std::vector<bool> touched(static_cast<size_t>(cols * rows), false);
    for (int64_t s : in.sets_of_source[src]) {
      const PlanPatchSet& set = in.sets[s];
      for (int64_t spot = 0; spot < in.n; ++spot) {
        const int64_t px0 = clamp(left_x(set, spot), 0, source.width_px);
        const int64_t px1 = clamp(left_x(set, spot) + set.read_px, 0, source.width_px);
        const int64_t py0 = clamp(top_y(set, spot), 0, source.height_px);
        const int64_t py1 = clamp(top_y(set, spot) + set.read_px, 0, source.height_px);
        if (px1 <= px0 || py1 <= py0) continue;
        const int64_t tx0 = px0 / source.tile_width_px, tx1 = ceil_div(px1, source.tile_width_px);
        const int64_t ty0 = py0 / source.tile_height_px, ty1 = ceil_div(py1, source.tile_height_px);
        plan.naive_tile_reads += (tx1 - tx0) * (ty1 - ty0);
        for (int64_t ty = ty0; ty < ty1; ++ty) {
          for (int64_t tx = tx0; tx < tx1; ++tx) touched[static_cast<size_t>(ty * cols + tx)] = true;
        }
      }
    }
    plan.tiles_needed += std::count(touched.begin(), touched.end(), true);
  }
}

}  // namespace

ReadPlan plan_reads(const double* centers_xy, int64_t n_spots, const std::vector<PlanSource>& sources,
                    const std::vector<PlanPatchSet>& patch_sets, int64_t max_bytes, int64_t max_step_spots,
                    int64_t reads_in_flight) {
  if (n_spots < 0) throw std::invalid_argument("n_spots must be >= 0");
  if (max_step_spots < 1) throw std::invalid_argument("max_step_spots must be >= 1");
  if (reads_in_flight < 1) throw std::invalid_argument("reads_in_flight must be >= 1");
  for (const PlanSource& s : sources) {
    if (s.width_px <= 0 || s.height_px <= 0 || s.tile_width_px <= 0 || s.tile_height_px <= 0) {
      throw std::invalid_argument("source sizes and tile sizes must be positive");
    }
  }
  Inputs in{centers_xy,
            n_spots,
            sources,
            patch_sets,
            std::vector<std::vector<int64_t>>(sources.size()),
            std::vector<int64_t>(sources.size(), 0)};
  for (size_t s = 0; s < patch_sets.size(); ++s) {
    const PlanPatchSet& set = patch_sets[s];
    if (set.source < 0 || set.source >= static_cast<int64_t>(sources.size())) {
      throw std::invalid_argument("patch set " + std::to_string(s) + " names source " + std::to_string(set.source) +
                                  " of " + std::to_string(sources.size()));
    }
    if (set.read_px <= 0) throw std::invalid_argument("read_px must be positive");
    in.sets_of_source[set.source].push_back(static_cast<int64_t>(s));
    // A step may span the patch plus two tile rows: one for the patch's misalignment, one of
    // spots below it. Dense spots share rows; sparse ones get small steps, never tall windows.
    const int64_t th = sources[set.source].tile_height_px;
    in.limit_rows[set.source] = std::max(in.limit_rows[set.source], (ceil_div(set.read_px, th) + 2) * th);
  }
  for (size_t src = 0; src < sources.size(); ++src) {
    if (in.sets_of_source[src].empty())
      throw std::invalid_argument("source " + std::to_string(src) + " has no patch set");
  }

  ReadPlan plan;
  if (n_spots == 0) {
    plan.n_sources = static_cast<int64_t>(sources.size());
    plan.step_offsets.push_back(0);
    return plan;
  }
  // Halve the stripes until the plan fits; give up when narrowing stops helping (the windows
  // are then as narrow as a patch and its tiles) or every spot has its own stripe.
  int64_t n_stripes = 1, stalls = 0;
  plan = plan_with_stripes(in, n_stripes, max_step_spots, reads_in_flight);
  while (max_bytes > 0 && plan.peak_bytes > max_bytes) {
    if (n_stripes >= n_spots || stalls >= 3) {
      throw std::runtime_error("memory budget of " + std::to_string(max_bytes >> 20) +
                               " MiB is too small: the "
                               "narrowest read plan needs " +
                               std::to_string((plan.peak_bytes >> 20) + 1) + " MiB");
    }
    n_stripes = std::min(n_stripes * 2, n_spots);
    ReadPlan narrower = plan_with_stripes(in, n_stripes, max_step_spots, reads_in_flight);
    stalls = narrower.peak_bytes < plan.peak_bytes ? 0 : stalls + 1;
    plan = std::move(narrower);
  }
  count_needed_tiles(in, plan);
  return plan;
}

}  // namespace m2ort
