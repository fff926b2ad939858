// m2ort_fast._core: the native side of m2ort-fast.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "m2ort-fast native core";
}
