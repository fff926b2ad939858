// m2ort_fast._core: the native side of m2ort-fast.
//
// This file only validates Python arguments and binds; the kernels are in batch.cpp. Every bad
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

namespace py = pybind11;

namespace {

std::string shape_of(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s << (d ? ", " : "") << a.shape(d);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw py::value_error(where + ": " + what);
}

py::array as_array(const py::object& obj, const std::string& where, const std::string& name) {
  if (!py::isinstance<py::array>(obj)) {
    fail(where, name + " must be a numpy.ndarray, got " + py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  return py::reinterpret_borrow<py::array>(obj);
}

template <typename T>
void require_dtype(const py::array& a, const std::string& where, const std::string& name) {
  if (!a.dtype().equal(py::dtype::of<T>())) {
    fail(where, name + " must have dtype " + py::str(py::dtype::of<T>()).cast<std::string>() + ", got " + dtype_name(a));
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
  if (num_threads < 0) fail(where, "num_threads must be >= 0 (0 = one per CPU core), got " + std::to_string(num_threads));
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
  const bool shape_ok = out.ndim() == static_cast<py::ssize_t>(shape.size()) &&
                        std::equal(shape.begin(), shape.end(), out.shape());
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

py::array_t<float> assemble_batch(const py::object& patches_obj, const std::vector<double>& mean_values,
                                  const std::vector<double>& std_values, const py::object& out_obj,
                                  int64_t num_threads) {
  const std::string where = "assemble_batch";
  py::array patches = as_array(patches_obj, where, "patches");
  require_dtype<uint8_t>(patches, where, "patches");
  if (patches.ndim() != 4 || patches.shape(3) != 3) {
    fail(where, "patches must have shape (N, H, W, 3), got " + shape_of(patches));
  }
  require_c_contiguous(patches, where, "patches");
  const auto mean = three_floats(mean_values, where, "mean", false);
  const auto std_dev = three_floats(std_values, where, "std", true);
  const int64_t threads = thread_count(num_threads, where);
  const int64_t n = patches.shape(0), height = patches.shape(1), width = patches.shape(2);
  py::array_t<float> out = output_array<float>(out_obj, {n, 3, height, width}, patches, where);

  const auto* src = static_cast<const uint8_t*>(patches.data());
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    m2ort::assemble_batch(src, n, height, width, mean, std_dev, dst, threads);
  }
  return out;
}

py::array_t<uint8_t> crop_patches(const py::object& region_obj, const py::object& origins_obj, int64_t size_px,
                                  const py::object& out_obj, int64_t num_threads) {
  const std::string where = "crop_patches";
  py::array region = as_array(region_obj, where, "region");
  require_dtype<uint8_t>(region, where, "region");
  if (region.ndim() != 3 || region.shape(2) != 3) fail(where, "region must have shape (H, W, 3), got " + shape_of(region));

  py::array origins_any = as_array(origins_obj, where, "origins_px");
  const char kind = origins_any.dtype().kind();
  if (kind != 'i' && kind != 'u') fail(where, "origins_px must have an integer dtype (int64), got " + dtype_name(origins_any));
  if (origins_any.ndim() != 2 || origins_any.shape(1) != 2) {
    fail(where, "origins_px must have shape (N, 2) holding (x, y), got " + shape_of(origins_any));
  }
  // Small (N x 2): converting any integer dtype / layout to contiguous int64 costs nothing.
  auto origins = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(origins_any);
  if (size_px <= 0) fail(where, "size_px must be > 0, got " + std::to_string(size_px));
  const int64_t threads = thread_count(num_threads, where);
  const int64_t n = origins.shape(0);
  py::array_t<uint8_t> out = output_array<uint8_t>(out_obj, {n, size_px, size_px, 3}, region, where);

  const m2ort::RegionView view{static_cast<const uint8_t*>(region.data()), region.shape(0), region.shape(1),
                               region.strides(0), region.strides(1), region.strides(2)};
  const int64_t* origins_xy = origins.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    m2ort::crop_patches(view, origins_xy, n, size_px, dst, threads);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "m2ort-fast native core: multi-threaded batch assembly (runs with the GIL released).";

  m.def("assemble_batch", &assemble_batch, py::arg("patches"), py::arg("mean"), py::arg("std"),
        py::arg("out") = py::none(), py::arg("num_threads") = 0,
        R"doc(Normalise a batch of RGB patches into one NCHW float32 array.

patches: (N, H, W, 3) uint8, C-contiguous. mean, std: 3 floats each (R, G, B, on the 0-1 scale).
out: optional (N, 3, H, W) float32 C-contiguous array written in place. num_threads: 0 = one per
CPU core (fewer for small batches). Returns out, (N, 3, H, W) float32 = (patches / 255 - mean) / std.)doc");

  m.def("crop_patches", &crop_patches, py::arg("region"), py::arg("origins_px"), py::arg("size_px"),
        py::arg("out") = py::none(), py::arg("num_threads") = 0,
        R"doc(Crop square patches from a decoded RGB region.

region: (H, W, 3) uint8 (any strides, e.g. an RGBA array's [..., :3] view). origins_px: (N, 2)
integer top-left (x, y) of each patch in region pixels; patches may lie partly or wholly outside
the region, where they are filled with white (255). size_px: patch side. out: optional
(N, size_px, size_px, 3) uint8 C-contiguous array written in place. Returns out.)doc");
}
