#pragma once
// difftrain: the training step of text-to-image diffusion models, header-only.
#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/philox.hpp"
#include "difftrain/core/prediction_type.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/kernels/kernels.hpp"
#include "difftrain/loss/loss.hpp"
#include "difftrain/schedule/schedule.hpp"
#include "difftrain/train/train.hpp"
