// The implementations of stb_image and stb_image_write, compiled once into
// difftrain_tools (see stb_impl.hpp).
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "stb_impl.hpp"
