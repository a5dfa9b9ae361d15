#pragma once
// difftrain/models/vae: the frozen AutoencoderKL (config, blocks, model, loading, LatentEncoder
// wrapper, latent cache).
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/diagonal_gaussian.hpp"
#include "difftrain/models/vae/latent_cache.hpp"
#include "difftrain/models/vae/vae_blocks.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/models/vae/vae_conv.hpp"
#include "difftrain/models/vae/vae_encoder.hpp"
#include "difftrain/models/vae/vae_load.hpp"
