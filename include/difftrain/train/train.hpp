#pragma once
// The training step and the loop around it: optimizers, LR schedules, EMA, clipping,
// checkpoints and the trainer.
#include "difftrain/train/checkpoint.hpp"
#include "difftrain/train/configured_timesteps.hpp"
#include "difftrain/train/diffusion_train_step.hpp"
#include "difftrain/train/ema.hpp"
#include "difftrain/train/grad_clip.hpp"
#include "difftrain/train/identity_encoder.hpp"
#include "difftrain/train/lr_schedule.hpp"
#include "difftrain/train/optimizer.hpp"
#include "difftrain/train/trainer.hpp"
