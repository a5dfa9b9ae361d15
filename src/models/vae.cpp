// The VAE compiled once for the project's own targets (see unet.cpp).
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/vae_load.hpp"

namespace difftrain::models {

template class AutoencoderKL<float>;
template class AutoencoderKL<double>;
template AutoencoderKL<float> load_vae<float>(const std::string&);
template AutoencoderKL<double> load_vae<double>(const std::string&);
template AutoencoderKL<float> load_vae_single_file<float>(const std::string&,
                                                          const AutoencoderKLConfig&);
template AutoencoderKL<double> load_vae_single_file<double>(const std::string&,
                                                            const AutoencoderKLConfig&);

}  // namespace difftrain::models
