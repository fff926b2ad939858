// The read plan of the streamed engine: which rows of which pyramid levels to decode, in what
// order, so that every tile a slide's spots need is decoded once and held only while spots
// still need it, in memory bounded by a budget. Plain C++ (module.cpp validates and binds).
//
// Vocabulary. A *source* is one pyramid level read by the engine (its size and tile grid). A
// *patch set* is one model input: for every spot, the top-left corner of a read_px x read_px
// square of one source. Several patch sets may read the same source (their windows are shared).
//
// The plan sorts the spots by vertical *stripe* (an x range of level 0; one stripe unless the
// budget forces more), then by centre y, then x. Within a stripe it cuts the spots into *steps*.
// For each step and source the engine holds a *window*: the source's rows [keep_from, bottom)
// over the stripe's tile-aligned columns [x0, x1). Before a step, rows above keep_from are
// dropped (no later spot of the stripe needs them) and rows [read_y0, read_y1) are decoded and
// appended; then every patch of the step's spots lies inside the window (or outside the level,
// where it reads as white). Reads are tile-aligned, so within a stripe each tile is decoded once;
// tiles in the columns two stripes share are decoded once per stripe (counted in tiles_decoded).
#pragma once

#include <cstdint>
#include <vector>

namespace m2ort {

struct PlanSource {
  int64_t width_px, height_px;            // size of the pyramid level
  int64_t tile_width_px, tile_height_px;  // its tile grid (a stripped level: a wide "tile")
};

struct PlanPatchSet {
  int64_t source;              // index into the sources
  int64_t read_px;             // side of the square read, in pixels of the source
  const int64_t* top_left_xy;  // (n_spots, 2) top-left (x, y) in pixels of the source
};

struct ReadPlan {
  int64_t n_sources = 0;
  std::vector<int64_t> order;           // (n_spots,) spot indices in processing order
  std::vector<int64_t> stripe_columns;  // (n_stripes, n_sources, 2) window columns [x0, x1)
  std::vector<int64_t> stripe_rows;     // (n_stripes, n_sources) most rows a window holds
  std::vector<int64_t> step_stripe;     // (n_steps,)
  std::vector<int64_t> step_offsets;    // (n_steps + 1,) step t's spots: order[offsets[t]:offsets[t+1]]
  std::vector<int64_t> step_rows;       // (n_steps, n_sources, 3): keep_from, read_y0, read_y1
  int64_t tiles_decoded = 0;            // tiles the reads cover (a tile read by two stripes counts twice)
  int64_t tiles_needed = 0;             // distinct tiles any patch touches (the least any reader must decode)
  int64_t naive_tile_reads = 0;         // sum over patches of the tiles each touches (one read per patch)
  int64_t peak_bytes = 0;               // windows (held with room to append: 2x rows) + reads in flight
  int64_t n_stripes() const { return n_sources ? static_cast<int64_t>(stripe_rows.size()) / n_sources : 0; }
  int64_t n_steps() const { return static_cast<int64_t>(step_stripe.size()); }
};

// centers_xy: (n_spots, 2) level-0 (x, y) spot centres, used for ordering and stripes only.
// max_bytes: budget for peak_bytes (<= 0: unbounded). max_step_spots: most spots per step.
// reads_in_flight: how many steps' decoded rows the engine holds besides the windows (queued
// between its reader and its assembler); peak_bytes counts that many of the largest step.
// Throws std::invalid_argument for inconsistent input, std::runtime_error when even the
// narrowest stripe does not fit the budget.
ReadPlan plan_reads(const double* centers_xy, int64_t n_spots, const std::vector<PlanSource>& sources,
                    const std::vector<PlanPatchSet>& patch_sets, int64_t max_bytes, int64_t max_step_spots,
                    int64_t reads_in_flight);

}  // namespace m2ort
