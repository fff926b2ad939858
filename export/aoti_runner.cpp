// An AOTInductor package run with the GIL released: torch's own Python runner holds the GIL for the
// whole call, so the engine's reader and assembler threads (Python between their C++ calls) stall
// while the model runs. Built on first use by torch.utils.cpp_extension (export/aoti_runner.py).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/extension.h>

#include <string>
#include <vector>

namespace {

class PackageRunner {
 public:
  PackageRunner(const std::string& path, int64_t device_index, int64_t num_runners)
      : loader_(path, "model", /*run_single_threaded=*/false, static_cast<size_t>(num_runners),
                static_cast<c10::DeviceIndex>(device_index)) {}

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) {
    pybind11::gil_scoped_release no_gil;
    return loader_.run(inputs);
  }

  std::unordered_map<std::string, std::string> metadata() { return loader_.get_metadata(); }

 private:
  torch::inductor::AOTIModelPackageLoader loader_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<PackageRunner>(m, "PackageRunner")
      .def(pybind11::init<const std::string&, int64_t, int64_t>(), pybind11::arg("path"), pybind11::arg("device_index"),
           pybind11::arg("num_runners"))
      .def("run", &PackageRunner::run, pybind11::arg("inputs"))
      .def("metadata", &PackageRunner::metadata);
}
