#pragma once
// Noise schedules: beta schedules, the zero-terminal-SNR rescale and the DDPM scheduler (training
// side); the DDIM and Euler-discrete schedulers and the guided sampling loop (inference side).

#include "difftrain/schedule/betas.hpp"
#include "difftrain/schedule/ddim_scheduler.hpp"
#include "difftrain/schedule/ddpm_scheduler.hpp"
#include "difftrain/schedule/euler_discrete_scheduler.hpp"
#include "difftrain/schedule/flow_match.hpp"
#include "difftrain/schedule/sample.hpp"
#include "difftrain/schedule/sampling_config.hpp"
