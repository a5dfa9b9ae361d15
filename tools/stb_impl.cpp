// The implementations of stb_image, stb_image_write and stb_image_resize, compiled once into
// difftrain_tools (see stb_impl.hpp).
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_RESIZE_IMPLEMENTATION
#include "stb_impl.hpp"
