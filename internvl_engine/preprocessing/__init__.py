"""Images to tiles exactly as the official code: opening and limits, the tile plan, Pillow-exact resizing, and
the CPU (`cpu.load_image`) and device (`device.load_image_on_device`) paths."""
