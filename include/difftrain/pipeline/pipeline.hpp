#pragma once
// A diffusers pipeline folder loaded (and written) as a whole, or an original single-file
// checkpoint loaded as one, and text-to-image sampling from it.
#include "difftrain/pipeline/generate_images.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "difftrain/pipeline/single_file.hpp"
