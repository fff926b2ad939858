// m2ort_fast._core: the native side of m2ort-fast.
//
// This file only validates Python arguments and binds; the kernels are in batch.cpp and resize.cpp. Every bad
// argument raises ValueError with a message naming the function, the argument and the problem.
// The kernels run with the GIL released, so other Python threads (slide decoding, the model)
// keep running meanwhile.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "batch.hpp"
#include "layer_norm.hpp"
#include "parallel.hpp"
#include "read_plan.hpp"
#include "resize.hpp"

namespace py = pybind11;

namespace {

std::string shape_of(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s << (d ? ", " : "") << a.shape(d);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

std::string dtype_name(const py::array& a) {
  return py::str(a.dtype()).cast<std::string>();
}

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw py::value_error(where + ": " + what);
}

py::array as_array(const py::object& obj, const std::string& where, const std::string& name) {
  if (!py::isinstance<py::array>(obj)) {
    fail(where,
         name + " must be a numpy.ndarray, got " + py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  return py::reinterpret_borrow<py::array>(obj);
}

template <typename T>
void require_dtype(const py::array& a, const std::string& where, const std::string& name) {
  if (!a.dtype().equal(py::dtype::of<T>())) {
    fail(where,
         name + " must have dtype " + py::str(py::dtype::of<T>()).cast<std::string>() + ", got " + dtype_name(a));
  }
}

void require_c_contiguous(const py::array& a, const std::string& where, const std::string& name) {
  if (!(a.flags() & py::array::c_style)) fail(where, name + " must be C-contiguous (use numpy.ascontiguousarray)");
}

std::array<double, 3> three_floats(const std::vector<double>& values, const std::string& where, const std::string& name,
                                   bool nonzero) {
  if (values.size() != 3) fail(where, name + " must have 3 values (R, G, B), got " + std::to_string(values.size()));
  for (double v : values) {
    if (!std::isfinite(v)) fail(where, name + " values must be finite");
    if (nonzero && v == 0.0) fail(where, name + " values must be non-zero");
  }
  return {values[0], values[1], values[2]};
}

int64_t thread_count(int64_t num_threads, const std::string& where) {
  if (num_threads < 0)
    fail(where, "num_threads must be >= 0 (0 = one per CPU this process may use), got " + std::to_string(num_threads));
  return num_threads;
}

// The caller's output buffer, checked, or a new one. Output must not overlap an input: the
// kernels read and write in parallel and would corrupt their own input.
template <typename T>
py::array_t<T> output_array(const py::object& out_obj, const std::vector<py::ssize_t>& shape, const py::array& input,
                            const std::string& where) {
  if (out_obj.is_none()) return py::array_t<T>(shape);
  py::array out = as_array(out_obj, where, "out");
  require_dtype<T>(out, where, "out");
  const bool shape_ok =
      out.ndim() == static_cast<py::ssize_t>(shape.size()) && std::equal(shape.begin(), shape.end(), out.shape());
  if (!shape_ok) {
    std::ostringstream expected;
    expected << "(";
    for (size_t d = 0; d < shape.size(); ++d) expected << (d ? ", " : "") << shape[d];
    expected << ")";
    fail(where, "out must have shape " + expected.str() + ", got " + shape_of(out));
  }
  require_c_contiguous(out, where, "out");
  if (!out.writeable()) fail(where, "out is read-only");
  if (py::module_::import("numpy").attr("may_share_memory")(out, input).cast<bool>()) {
    fail(where, "out must not share memory with the input");
  }
  return py::reinterpret_borrow<py::array_t<T>>(out);
}

// A batch of RGB patches as the kernels read it: (N, H, W, 3) uint8, C-contiguous.
py::array rgb_patches(const py::object& patches_obj, const std::string& where) {
  py::array patches = as_array(patches_obj, where, "patches");
  require_dtype<uint8_t>(patches, where, "patches");
  if (patches.ndim() != 4 || patches.shape(3) != 3) {
    fail(where, "patches must have shape (N, H, W, 3), got " + shape_of(patches));
  }
  require_c_contiguous(patches, where, "patches");
  return patches;
}

const char* kernel_name(m2ort::CpuKernel kernel) {
  switch (kernel) {
    case m2ort::CpuKernel::kAvx512Vbmi:
      return "avx512_vbmi";
    case m2ort::CpuKernel::kAvx512Bw:
      return "avx512_bw";
    case m2ort::CpuKernel::kAvx512Bf16:
      return "avx512_bf16";
    case m2ort::CpuKernel::kScalar:
      return "scalar";
    default:
      return "auto";
  }
}

std::vector<std::string> kernel_names(const std::vector<m2ort::CpuKernel>& kernels) {
  std::vector<std::string> names;
  for (const m2ort::CpuKernel kernel : kernels) names.push_back(kernel_name(kernel));
  return names;
}

// "auto", or one of the kernels available() lists (what *_kernels() says for the call's arguments;
// only asked for a named kernel).
template <typename Available>
m2ort::CpuKernel checked_kernel(const std::string& name, Available available, const std::string& what,
                                const std::string& where) {
  if (name == "auto") return m2ort::CpuKernel::kAuto;
  std::string listed;
  for (const m2ort::CpuKernel kernel : available()) {
    if (name == kernel_name(kernel)) return kernel;
    listed += std::string(", ") + kernel_name(kernel);
  }
  fail(where, "kernel '" + name + "' cannot " + what + " on this CPU (available: auto" + listed + ")");
}

// assemble_batch and assemble_batch_bf16: the same checks, then Kernel (m2ort::assemble_batch or
// its bf16 twin) into an array of Out: planes (N, 3, H, W), or tokens (N, T, p * p * 3) for patch_px p > 0.
template <typename Out, auto Kernel>
py::array_t<Out> assemble(const char* where_name, const py::object& patches_obj, const std::vector<double>& mean_values,
                          const std::vector<double>& std_values, const py::object& out_obj, int64_t num_threads,
                          const std::string& kernel_name, int64_t patch_px) {
  const std::string where = where_name;
  py::array patches = rgb_patches(patches_obj, where);
  const int64_t n = patches.shape(0), height = patches.shape(1), width = patches.shape(2);
  if (patch_px < 0) fail(where, "patch_px must be >= 0 (0 = planes), got " + std::to_string(patch_px));
  if (patch_px > 0 && (height % patch_px || width % patch_px)) {
    fail(where, "patch_px " + std::to_string(patch_px) + " does not divide the patches' " + std::to_string(height) +
                    " x " + std::to_string(width) + " px");
  }
  const std::string layout = patch_px ? "assemble tokens of " + std::to_string(patch_px) + " px" : "assemble";
  const m2ort::CpuKernel kernel =
      checked_kernel(kernel_name, [patch_px]() { return m2ort::assemble_kernels(patch_px); }, layout, where);
  const auto mean = three_floats(mean_values, where, "mean", false);
  const auto std_dev = three_floats(std_values, where, "std", true);
  const int64_t threads = thread_count(num_threads, where);
  const std::vector<py::ssize_t> shape =
      patch_px ? std::vector<py::ssize_t>{n, (height / patch_px) * (width / patch_px), patch_px * patch_px * 3}
               : std::vector<py::ssize_t>{n, 3, height, width};
  py::array_t<Out> out = output_array<Out>(out_obj, shape, patches, where);

  const auto* src = static_cast<const uint8_t*>(patches.data());
  Out* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    Kernel(src, n, height, width, patch_px, mean, std_dev, dst, threads, kernel);
  }
  return out;
}

py::array_t<float> assemble_batch(const py::object& patches_obj, const std::vector<double>& mean_values,
                                  const std::vector<double>& std_values, const py::object& out_obj, int64_t num_threads,
                                  const std::string& kernel, int64_t patch_px) {
  return assemble<float, m2ort::assemble_batch>("assemble_batch", patches_obj, mean_values, std_values, out_obj,
                                                num_threads, kernel, patch_px);
}

py::array_t<uint16_t> assemble_batch_bf16(const py::object& patches_obj, const std::vector<double>& mean_values,
                                          const std::vector<double>& std_values, const py::object& out_obj,
                                          int64_t num_threads, const std::string& kernel, int64_t patch_px) {
  return assemble<uint16_t, m2ort::assemble_batch_bf16>("assemble_batch_bf16", patches_obj, mean_values, std_values,
                                                        out_obj, num_threads, kernel, patch_px);
}

// x (..., W) bf16 bits -> the same shape: LayerNorm over the last axis (layer_norm.hpp).
py::array_t<uint16_t> layer_norm_bf16(const py::object& x_obj, const py::object& weight_obj, const py::object& bias_obj,
                                      double eps, const py::object& out_obj, int64_t num_threads,
                                      const std::string& kernel_name) {
  const std::string where = "layer_norm_bf16";
  py::array x = as_array(x_obj, where, "x");
  require_dtype<uint16_t>(x, where, "x");
  require_c_contiguous(x, where, "x");
  if (x.ndim() < 1 || x.shape(x.ndim() - 1) == 0) fail(where, "x must have a non-empty last axis, got " + shape_of(x));
  const int64_t width = x.shape(x.ndim() - 1), rows = x.size() / width;
  std::vector<const uint16_t*> params;
  for (const auto& [name, obj] : {std::pair{"weight", weight_obj}, std::pair{"bias", bias_obj}}) {
    py::array a = as_array(obj, where, name);
    require_dtype<uint16_t>(a, where, name);
    require_c_contiguous(a, where, name);
    if (a.ndim() != 1 || a.shape(0) != width) {
      fail(where, std::string(name) + " must have shape (" + std::to_string(width) + ",), got " + shape_of(a));
    }
    params.push_back(static_cast<const uint16_t*>(a.data()));
  }
  if (!(eps >= 0.0) || !std::isfinite(eps)) fail(where, "eps must be finite and >= 0");
  const m2ort::CpuKernel kernel = checked_kernel(kernel_name, m2ort::layer_norm_kernels, "run", where);
  const int64_t threads = thread_count(num_threads, where);
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  py::array_t<uint16_t> out = output_array<uint16_t>(out_obj, shape, x, where);
  const auto* src = static_cast<const uint16_t*>(x.data());
  uint16_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    m2ort::layer_norm_bf16(src, rows, width, params[0], params[1], eps, dst, threads, kernel);
  }
  return out;
}

py::array_t<uint8_t> crop_patches(const py::object& region_obj, const py::object& origins_obj, int64_t size_px,
                                  const py::object& out_obj, int64_t num_threads) {
  const std::string where = "crop_patches";
  py::array region = as_array(region_obj, where, "region");
  require_dtype<uint8_t>(region, where, "region");
  if (region.ndim() != 3 || region.shape(2) != 3)
    fail(where, "region must have shape (H, W, 3), got " + shape_of(region));

  py::array origins_any = as_array(origins_obj, where, "origins_px");
  const char kind = origins_any.dtype().kind();
  if (kind != 'i' && kind != 'u')
    fail(where, "origins_px must have an integer dtype (int64), got " + dtype_name(origins_any));
  if (origins_any.ndim() != 2 || origins_any.shape(1) != 2) {
    fail(where, "origins_px must have shape (N, 2) holding (x, y), got " + shape_of(origins_any));
  }
  // Small (N x 2): converting any integer dtype / layout to contiguous int64 costs nothing.
  auto origins = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(origins_any);
  if (size_px <= 0) fail(where, "size_px must be > 0, got " + std::to_string(size_px));
  const int64_t threads = thread_count(num_threads, where);
  const int64_t n = origins.shape(0);
  py::array_t<uint8_t> out = output_array<uint8_t>(out_obj, {n, size_px, size_px, 3}, region, where);

  const m2ort::RegionView view{static_cast<const uint8_t*>(region.data()),
                               region.shape(0),
                               region.shape(1),
                               region.strides(0),
                               region.strides(1),
                               region.strides(2)};
  const int64_t* origins_xy = origins.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    m2ort::crop_patches(view, origins_xy, n, size_px, dst, threads);
  }
  return out;
}

py::array_t<uint8_t> resize_patches(const py::object& patches_obj, int64_t size_px, const py::object& out_obj,
                                    int64_t num_threads, const std::string& kernel_name) {
  const std::string where = "resize_patches";
  py::array patches = rgb_patches(patches_obj, where);
  // Pillow picks the order of its two passes by their cost (a tie, horizontal first, for squares),
  // and the passes round in between: square patches (all the engine has) keep this bit-exact.
  if (patches.shape(1) != patches.shape(2))
    fail(where, "patches must be square (N, S, S, 3), got " + shape_of(patches));
  if (patches.shape(1) <= 0) fail(where, "patches must not be empty images, got " + shape_of(patches));
  if (size_px <= 0) fail(where, "size_px must be > 0, got " + std::to_string(size_px));
  const int64_t threads = thread_count(num_threads, where);
  const int64_t n = patches.shape(0), height = patches.shape(1), width = patches.shape(2);
  const m2ort::CpuKernel kernel = checked_kernel(
      kernel_name, [&] { return m2ort::resize_kernels(width, size_px); },
      "resize " + std::to_string(width) + " -> " + std::to_string(size_px), where);
  py::array_t<uint8_t> out = output_array<uint8_t>(out_obj, {n, size_px, size_px, 3}, patches, where);

  const auto* src = static_cast<const uint8_t*>(patches.data());
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    m2ort::resize_patches(src, n, height, width, size_px, size_px, dst, threads, kernel);
  }
  return out;
}

py::tuple resize_taps(int64_t in_size, int64_t out_size) {
  const std::string where = "resize_taps";
  constexpr int64_t kMaxSize = 1 << 20;
  if (in_size <= 0 || out_size <= 0 || in_size > kMaxSize || out_size > kMaxSize)
    fail(where, "sizes must be in 1.." + std::to_string(kMaxSize) + ", got " + std::to_string(in_size) + " -> " +
                    std::to_string(out_size));
  const m2ort::ResizeTaps taps = m2ort::resize_taps(static_cast<int>(in_size), static_cast<int>(out_size));
  py::array_t<int32_t> first({static_cast<py::ssize_t>(out_size)});
  py::array_t<int32_t> weights({static_cast<py::ssize_t>(out_size), static_cast<py::ssize_t>(taps.ksize)});
  std::copy(taps.first.begin(), taps.first.end(), first.mutable_data());
  std::copy(taps.weights.begin(), taps.weights.end(), weights.mutable_data());
  return py::make_tuple(first, weights);
}

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& values, const std::vector<py::ssize_t>& shape) {
  py::array_t<T> out(shape);
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

py::dict plan_reads(const py::object& centers_obj, const std::vector<std::array<int64_t, 4>>& sources_in,
                    const py::list& patch_sets_in, int64_t max_bytes, int64_t max_step_spots, int64_t reads_in_flight) {
  const std::string where = "plan_reads";
  py::array centers_any = as_array(centers_obj, where, "centers_px");
  if (centers_any.ndim() != 2 || centers_any.shape(1) != 2) {
    fail(where, "centers_px must have shape (N, 2) holding (x, y), got " + shape_of(centers_any));
  }
  auto centers = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(centers_any);
  const int64_t n = centers.shape(0);
  std::vector<m2ort::PlanSource> sources;
  for (const auto& s : sources_in) sources.push_back({s[0], s[1], s[2], s[3]});
  std::vector<py::array_t<int64_t>> keep_alive;
  std::vector<m2ort::PlanPatchSet> patch_sets;
  for (const auto& item : patch_sets_in) {
    auto entry = item.cast<py::tuple>();
    if (entry.size() != 3) fail(where, "each patch set must be (source, read_px, top_left_px)");
    py::array top_left_any = as_array(entry[2], where, "top_left_px");
    if (top_left_any.ndim() != 2 || top_left_any.shape(1) != 2 || top_left_any.shape(0) != n) {
      fail(where, "top_left_px must have shape (" + std::to_string(n) + ", 2), got " + shape_of(top_left_any));
    }
    keep_alive.push_back(py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(top_left_any));
    patch_sets.push_back({entry[0].cast<int64_t>(), entry[1].cast<int64_t>(), keep_alive.back().data()});
  }
  m2ort::ReadPlan plan;
  {
    py::gil_scoped_release release;
    plan = m2ort::plan_reads(centers.data(), n, sources, patch_sets, max_bytes, max_step_spots, reads_in_flight);
  }
  const auto n_src = static_cast<py::ssize_t>(plan.n_sources);
  const auto n_stripes = static_cast<py::ssize_t>(plan.n_stripes());
  const auto n_steps = static_cast<py::ssize_t>(plan.n_steps());
  py::dict out;
  out["order"] = to_numpy(plan.order, {static_cast<py::ssize_t>(n)});
  out["stripe_columns"] = to_numpy(plan.stripe_columns, {n_stripes, n_src, 2});
  out["stripe_rows"] = to_numpy(plan.stripe_rows, {n_stripes, n_src});
  out["step_stripe"] = to_numpy(plan.step_stripe, {n_steps});
  out["step_offsets"] = to_numpy(plan.step_offsets, {n_steps + 1});
  out["step_rows"] = to_numpy(plan.step_rows, {n_steps, n_src, 3});
  out["tiles_decoded"] = plan.tiles_decoded;
  out["tiles_needed"] = plan.tiles_needed;
  out["naive_tile_reads"] = plan.naive_tile_reads;
  out["peak_bytes"] = plan.peak_bytes;
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "m2ort-fast native core: read plan, multi-threaded crop, resize and batch assembly (GIL released).";

  m.def("assemble_batch", &assemble_batch, py::arg("patches"), py::arg("mean"), py::arg("std"),
        py::arg("out") = py::none(), py::arg("num_threads") = 0, py::arg("kernel") = "auto", py::arg("patch_px") = 0,
        R"doc(Normalise a batch of RGB patches into one float32 array: (patches / 255 - mean) / std.

patches: (N, H, W, 3) uint8, C-contiguous. mean, std: 3 floats each (R, G, B, on the 0-1 scale).
patch_px: 0 (default) writes planes, (N, 3, H, W); p > 0 (dividing H and W) writes tokens,
(N, (H/p) * (W/p), p * p * 3): the grid's p x p squares in row-major order, each flattened
(p1 p2 c), as m2ort_fast.model.patchify lays them out. out: optional C-contiguous float32 array of
that shape written in place. num_threads: 0 = one per CPU in this process's affinity mask (fewer
for small batches). kernel: "auto" (what assemble_kernels(patch_px) says it picks) or one it lists; all
give the same bits. Returns out.)doc");

  m.def(
      "assemble_kernels", [](int64_t patch_px) { return kernel_names(m2ort::assemble_kernels(patch_px)); },
      py::arg("patch_px") = 0,
      R"doc(The kernels assemble_batch and assemble_batch_bf16 can run on this CPU for a layout, the one "auto" picks first.

For tokens of 4, 8 or 16 px, "avx512_bf16" where the CPU has AVX-512 BF16 and VBMI (bf16 values
computed, where assemble_bf16_affine says so; else the lookups); "avx512_vbmi" (byte permutes over
the same per-channel table) where the CPU has AVX-512 VBMI, for planes (patch_px 0) and those
tokens; then "scalar". For float32 tokens "auto" runs "scalar", faster there than the lookups.
Every kernel gives the same bits.)doc");

  m.def(
      "assemble_bf16_affine",
      [](const std::vector<double>& mean_values, const std::vector<double>& std_values) {
        const std::string where = "assemble_bf16_affine";
        return m2ort::affine_bf16_runs(three_floats(mean_values, where, "mean", false),
                                       three_floats(std_values, where, "std", true));
      },
      py::arg("mean"), py::arg("std"),
      R"doc(Whether the "avx512_bf16" kernel computes assemble_batch_bf16's tokens for this mean and std.

It computes channel c's value of byte v as bfloat16(fma(v, 1 / (255 std[c]), -mean[c] / std[c]))
in float32, 16 values per instruction, where that gives the lookup table's bits for all 256 bytes
of every channel (checked on each call, by the kernel itself); elsewhere, and for float32 output,
it runs "avx512_vbmi"'s lookups. False also where the CPU lacks AVX-512 BF16 and VBMI.)doc");

  m.def("assemble_batch_bf16", &assemble_batch_bf16, py::arg("patches"), py::arg("mean"), py::arg("std"),
        py::arg("out") = py::none(), py::arg("num_threads") = 0, py::arg("kernel") = "auto", py::arg("patch_px") = 0,
        R"doc(assemble_batch rounded to bfloat16: the same float32 values cast as torch casts them (round
to nearest even), returned as their bit patterns, uint16 in assemble_batch's shape for patch_px
(view them with torch.from_numpy(a).view(torch.bfloat16)). out: optional C-contiguous uint16 array.)doc");

  m.def("layer_norm_bf16", &layer_norm_bf16, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("out") = py::none(), py::arg("num_threads") = 0, py::arg("kernel") = "auto",
        R"doc(LayerNorm over the last axis of bfloat16 values, as their bit patterns (uint16).

x: (..., W) uint16, C-contiguous (a bf16 tensor's .view(torch.uint16).numpy()). weight, bias: (W,)
uint16. Per row, in float32: the mean and biased variance from the sums of d = x - x[0] and d^2
(16 x 2 lanes, then a fixed tree), rstd = 1 / sqrt(var + eps), y = (x * rstd - mean * rstd) *
weight + bias (two FMAs), rounded to nearest even: torch.nn.functional.layer_norm's function on
bf16 rows in float32 (torch reaches the variance by Welford's update instead). out: optional
uint16 array of x's shape. num_threads: 0 = one per CPU in this process's affinity mask (fewer
for few rows). kernel: "auto" (the first of layer_norm_kernels()) or one it lists; all give the
same bits. Returns out.)doc");
  m.def(
      "layer_norm_kernels", []() { return kernel_names(m2ort::layer_norm_kernels()); },
      R"doc(The kernels layer_norm_bf16 can run on this CPU, the one "auto" picks first: "avx512_bw" where
the CPU has AVX-512 (F, BW, VL, DQ) and FMA, then "scalar". Every kernel gives the same bits.)doc");
  m.def("crop_patches", &crop_patches, py::arg("region"), py::arg("origins_px"), py::arg("size_px"),
        py::arg("out") = py::none(), py::arg("num_threads") = 0,
        R"doc(Crop square patches from a decoded RGB region.

region: (H, W, 3) uint8 (any strides, e.g. an RGBA array's [..., :3] view). origins_px: (N, 2)
integer top-left (x, y) of each patch in region pixels; patches may lie partly or wholly outside
the region, where they are filled with white (255). size_px: patch side. out: optional
(N, size_px, size_px, 3) uint8 C-contiguous array written in place. Returns out.)doc");
  m.def("resize_patches", &resize_patches, py::arg("patches"), py::arg("size_px"), py::arg("out") = py::none(),
        py::arg("num_threads") = 0, py::arg("kernel") = "auto",
        R"doc(Resize square RGB patches to size_px x size_px, bit for bit as m2ort_fast.crop.resize_patches.

patches: (N, S, S, 3) uint8, C-contiguous. The same antialiased bilinear arithmetic as Pillow's
Image.resize(BILINEAR, reducing_gap=None), with the weights computed once for the batch and the
patches split over num_threads threads (0 = one per CPU in this process's affinity mask). out: optional
(N, size_px, size_px, 3) uint8 C-contiguous array written in place. kernel: both passes',
"auto" (the first of resize_kernels(S, size_px)) or one it lists; all give the same bytes. Returns out.)doc");
  m.def(
      "resize_kernels",
      [](int64_t in_size, int64_t out_size) { return kernel_names(m2ort::resize_kernels(in_size, out_size)); },
      py::arg("in_size"), py::arg("out_size"),
      R"doc(The kernels resize_patches can run for in_size -> out_size on this CPU, the one "auto" picks first.

"avx512_vbmi" (a byte permute and 32-bit multiply-adds, 16 output bytes at a time) where the CPU has
AVX-512 VBMI and the shrink is at most about 4x, then "scalar". Every kernel gives the same bytes.)doc");
  m.def("resize_taps", &resize_taps, py::arg("in_size"), py::arg("out_size"),
        R"doc(One axis of resize_patches' arithmetic, for kernels on other devices to resize bit for bit.

Returns (first (out_size,) int32, weights (out_size, K) int32): output i of a pass is
clip((sum_k weights[i, k] * in[first[i] + k] + 2**21) >> 22, 0, 255) (RESIZE_PRECISION_BITS = 22);
resize_patches runs the horizontal pass, rounds to uint8, then the vertical pass. in_size ==
out_size gives the identity (K = 1, weight 2**22).)doc");
  m.attr("RESIZE_PRECISION_BITS") = m2ort::kResizePrecisionBits;
  m.def("available_cpus", &m2ort::available_cpus,
        R"doc(CPUs this process may run on (its affinity mask; the host's count where there is none): the
number of threads the kernels above use when num_threads is 0 and the batch is large enough.)doc");
  m.def("plan_reads", &plan_reads, py::arg("centers_px"), py::arg("sources"), py::arg("patch_sets"),
        py::arg("max_bytes") = 0, py::arg("max_step_spots") = 256, py::arg("reads_in_flight") = 1,
        R"doc(Plan the streamed engine's reads: each needed tile decoded once, held while spots need it.

centers_px: (N, 2) float level-0 spot centres (x, y), for ordering. sources: one
(width_px, height_px, tile_width_px, tile_height_px) per pyramid level read. patch_sets: one
(source, read_px, top_left_px (N, 2) int) per model input. max_bytes: budget for peak_bytes
(0: none); reads_in_flight: decoded steps held besides the windows. Returns a dict: order (N,),
stripe_columns (S, n_sources, 2), stripe_rows (S, n_sources), step_stripe (T,), step_offsets
(T + 1,), step_rows (T, n_sources, 3) = (keep_from, read_y0, read_y1), tiles_decoded,
tiles_needed, naive_tile_reads, peak_bytes. See csrc/read_plan.hpp.)doc");
}
