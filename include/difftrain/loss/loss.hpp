#pragma once
// Loss weightings and loss types.
#include "difftrain/kernels/loss.hpp"
#include "difftrain/loss/configured_weighting.hpp"
#include "difftrain/loss/huber_schedule.hpp"
#include "difftrain/loss/weighting.hpp"
