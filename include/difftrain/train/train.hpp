#pragma once
// The training step and what runs around it.
#include "difftrain/train/diffusion_train_step.hpp"
#include "difftrain/train/identity_encoder.hpp"
