#pragma once
// The one place that includes the stb headers of difftrain's tools (stb is a dependency of the
// tools, examples and tests, not of the library), together with their implementations.
//
// Rule: include stb only through this header, never <stb/stb_image*.h> directly. The
// implementations are compiled `static` (STB_*_STATIC): every translation unit that includes this
// header gets a private copy, so it works whether a program is one translation unit (the CLI, the
// demo) that reaches it from several headers (#pragma once keeps it to one copy) or several
// (a test executable), with no duplicate symbols at link time.

#if defined(STBI_INCLUDE_STB_IMAGE_H) || defined(INCLUDE_STB_IMAGE_WRITE_H) || \
    defined(STBIR_INCLUDE_STB_IMAGE_RESIZE_H)
#error "stb was included before tools/stb_impl.hpp: include stb only through stb_impl.hpp"
#endif

#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_HDR          // 8-bit images only
#define STBI_NO_LINEAR
#define STBI_FAILURE_USERMSG  // readable reasons from stbi_failure_reason()
#include <stb/stb_image.h>

#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>

#define STB_IMAGE_RESIZE_STATIC
#define STB_IMAGE_RESIZE_IMPLEMENTATION
#include <stb/stb_image_resize.h>

#include <stb/stb_easy_font.h>  // header-only, always static
