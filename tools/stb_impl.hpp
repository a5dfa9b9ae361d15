#pragma once
// The one place that includes the stb headers of difftrain's tools (stb is a dependency of the
// tools library, not of difftrain itself), with the settings they are compiled with.
//
// Rule: include stb only through this header (or image_io.hpp, which includes it), never
// <stb/stb_image*.h> directly. stb_impl.cpp compiles the implementations once, with external
// linkage, into difftrain_tools; every other translation unit gets the declarations only (cheap:
// the implementations are preprocessed away). stb_easy_font.h (header-only, always static) is
// included by plot.cpp alone, its one user.

#if defined(STBI_INCLUDE_STB_IMAGE_H) || defined(INCLUDE_STB_IMAGE_WRITE_H) || \
    defined(STBIR_INCLUDE_STB_IMAGE_RESIZE_H)
#error "stb was included before tools/stb_impl.hpp: include stb only through stb_impl.hpp"
#endif

#define STBI_NO_HDR  // 8-bit images only
#define STBI_NO_LINEAR
#define STBI_FAILURE_USERMSG  // readable reasons from stbi_failure_reason()
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
