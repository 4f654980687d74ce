// pybind11 module internvl_engine._C: checked NumPy entry points to the host hot paths in csrc/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "tile_normalize.h"

namespace py = pybind11;

namespace {

std::string shape_string(const py::array& array) {
  std::ostringstream text;
  text << "[";
  for (py::ssize_t i = 0; i < array.ndim(); ++i) text << (i ? ", " : "") << array.shape(i);
  text << "]";
  return text.str();
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::ostringstream text;
  text << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text << (i ? ", " : "") << shape[i];
  text << "]";
  return text.str();
}

// Returns `object` as a C-contiguous array_t<T> without converting or copying it: a wrong type, dtype or
// layout is a ValueError (a silent cast would also detach `out` from the caller's tensor).
template <typename T>
py::array_t<T, py::array::c_style> checked_array(const py::handle& object, const char* label,
                                                  const char* dtype_name) {
  if (!py::isinstance<py::array>(object)) {
    throw py::value_error(std::string(label) + " must be a numpy array (use tensor.numpy()), got " +
                          std::string(py::str(py::type::of(object).attr("__name__"))));
  }
  auto array = py::reinterpret_borrow<py::array>(object);
  if (!py::isinstance<py::array_t<T>>(array)) {
    throw py::value_error(std::string(label) + " must have dtype " + dtype_name + ", got " +
                          std::string(py::str(array.dtype())));
  }
  if (!(array.flags() & py::array::c_style)) {
    throw py::value_error(std::string(label) + " must be C-contiguous");
  }
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(array);
}

void normalize_tiles(const py::object& src_object, const py::object& out_object, const py::object& lut_object,
                     std::int64_t grid_cols, std::int64_t grid_rows, std::int64_t tile_size,
                     std::int64_t first_tile) {
  if (grid_cols < 1 || grid_rows < 1 || tile_size < 1 || first_tile < 0) {
    std::ostringstream text;
    text << "grid_cols, grid_rows and tile_size must be >= 1 and first_tile >= 0, got " << grid_cols << ", "
         << grid_rows << ", " << tile_size << ", " << first_tile;
    throw py::value_error(text.str());
  }
  auto src = checked_array<std::uint8_t>(src_object, "src", "uint8");
  auto out = checked_array<float>(out_object, "out", "float32");
  auto lut = checked_array<float>(lut_object, "lut", "float32");

  const std::vector<std::int64_t> expected{grid_rows * tile_size, grid_cols * tile_size, 3};
  if (src.ndim() != 3 || src.shape(0) != expected[0] || src.shape(1) != expected[1] || src.shape(2) != 3) {
    throw py::value_error("src must have shape [rows*tile, cols*tile, 3] = " + shape_string(expected) +
                          ", got " + shape_string(src));
  }
  if (out.ndim() != 4 || out.shape(1) != 3 || out.shape(2) != tile_size || out.shape(3) != tile_size) {
    throw py::value_error("out must have shape [N, 3, " + std::to_string(tile_size) + ", " +
                          std::to_string(tile_size) + "], got " + shape_string(out));
  }
  const std::int64_t end_tile = first_tile + grid_cols * grid_rows;
  if (end_tile > out.shape(0)) {
    throw py::value_error("out has " + std::to_string(out.shape(0)) + " tiles, too few for tiles [" +
                          std::to_string(first_tile) + ", " + std::to_string(end_tile) + ")");
  }
  if (!out.writeable()) throw py::value_error("out must be writeable");
  if (lut.ndim() != 2 || lut.shape(0) != 3 || lut.shape(1) != 256) {
    throw py::value_error("lut must have shape [3, 256], got " + shape_string(lut));
  }

  const std::uint8_t* src_data = src.data();
  float* out_data = out.mutable_data();
  const float* lut_data = lut.data();
  // The arrays stay referenced by the caller's frame, so their buffers outlive the unlocked section.
  py::gil_scoped_release release;
  internvl::normalize_tiles(src_data, out_data, lut_data, grid_cols, grid_rows, tile_size, first_tile);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Host-side hot paths of internvl_engine (C++), each with a Python twin.";
  m.def("normalize_tiles", &normalize_tiles, py::arg("src"), py::arg("out"), py::arg("lut"), py::arg("grid_cols"),
        py::arg("grid_rows"), py::arg("tile_size"), py::arg("first_tile"),
        R"doc(Resized uint8 image -> normalised float32 tiles, in place, in one pass.

src: uint8 [grid_rows*tile_size, grid_cols*tile_size, 3], C-contiguous.
out: float32 [N, 3, tile_size, tile_size], C-contiguous, writeable; tiles first_tile ..
     first_tile + grid_cols*grid_rows - 1 are written, row-major over the grid.
lut: float32 [3, 256]; out[t, c, y, x] = lut[c, src[...]].
Raises ValueError on a wrong type, dtype, shape or layout. Releases the GIL while it runs.)doc");
}
