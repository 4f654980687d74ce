#include "tile_normalize.h"

namespace internvl {

void normalize_tiles(const std::uint8_t* src, float* out, const float* lut, std::int64_t grid_cols,
                     std::int64_t grid_rows, std::int64_t tile_size, std::int64_t first_tile) noexcept {
  const float* __restrict lut_r = lut;
  const float* __restrict lut_g = lut + 256;
  const float* __restrict lut_b = lut + 512;
  const std::int64_t plane = tile_size * tile_size;  // floats per channel plane of one tile
  const std::int64_t src_row = grid_cols * tile_size * 3;  // bytes per image row

  // Walk the source once, row by row: each image row feeds one row of every tile in its grid row,
  // and each of those becomes three contiguous runs (R, G, B planes) in the output.
  for (std::int64_t grid_row = 0; grid_row < grid_rows; ++grid_row) {
    for (std::int64_t y = 0; y < tile_size; ++y) {
      const std::uint8_t* row = src + (grid_row * tile_size + y) * src_row;
      for (std::int64_t grid_col = 0; grid_col < grid_cols; ++grid_col) {
        const std::int64_t tile = first_tile + grid_row * grid_cols + grid_col;
        const std::uint8_t* __restrict in = row + grid_col * tile_size * 3;
        float* __restrict out_r = out + tile * 3 * plane + y * tile_size;
        float* __restrict out_g = out_r + plane;
        float* __restrict out_b = out_g + plane;
        for (std::int64_t x = 0; x < tile_size; ++x) {
          out_r[x] = lut_r[in[3 * x]];
          out_g[x] = lut_g[in[3 * x + 1]];
          out_b[x] = lut_b[in[3 * x + 2]];
        }
      }
    }
  }
}

}  // namespace internvl
