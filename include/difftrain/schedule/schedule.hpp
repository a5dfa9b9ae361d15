#pragma once
// Noise schedules on the training side: beta schedules, the zero-terminal-SNR rescale and the
// DDPM scheduler.

#include "difftrain/schedule/betas.hpp"
#include "difftrain/schedule/ddpm_scheduler.hpp"
