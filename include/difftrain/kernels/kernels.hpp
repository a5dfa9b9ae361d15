#pragma once
// The SIMD elementwise kernels of the training step.
#include "difftrain/kernels/forward_diffusion.hpp"
#include "difftrain/kernels/loss.hpp"
#include "difftrain/kernels/noise.hpp"
