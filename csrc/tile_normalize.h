// Host hot path of image preprocessing: resized uint8 RGB image -> normalised float32 tiles, one pass.
#pragma once

#include <cstdint>

namespace internvl {

// Cuts a grid_rows x grid_cols grid of tile_size x tile_size tiles out of `src` and writes each tile,
// channel-planar and mapped through `lut`, into `out` at tile index first_tile + row * grid_cols + col.
//
//   src: uint8   [grid_rows * tile_size, grid_cols * tile_size, 3]  C-contiguous (interleaved RGB)
//   out: float32 [>= first_tile + grid_rows * grid_cols, 3, tile_size, tile_size]  C-contiguous
//   lut: float32 [3, 256]: lut[c * 256 + v] is the value of byte v in channel c
//
// No checks and no Python: the caller validates shapes, and may run this without the GIL.
void normalize_tiles(const std::uint8_t* src, float* out, const float* lut, std::int64_t grid_cols,
                     std::int64_t grid_rows, std::int64_t tile_size, std::int64_t first_tile) noexcept;

}  // namespace internvl
