// A complete training loop on DiffusionTrainStep: a per-pixel MLP denoiser learns synthetic
// two-colour images (identity "VAE", zero text context, SD 1.5 schedule, Min-SNR-5, SGD).
#include <cstdio>
#include <cstdlib>

#include "toy_model.hpp"

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 400;
  const int window = 20;
  if (steps < 2 * window) {
    std::fprintf(stderr, "train_toy: steps is %d, expected at least %d\n", steps, 2 * window);
    return 2;
  }
  const toy::ToyRun run = toy::train_toy(steps, window);
  for (std::size_t s = 0; s < run.losses.size(); s += 25)
    std::printf("step %4zu  loss %.5f\n", s, run.losses[s]);
  std::printf("mean loss of the first %d steps %.5f, of the last %d steps %.5f: fell %.1fx\n",
              window, run.first_mean, window, run.last_mean, run.first_mean / run.last_mean);
  return run.last_mean < run.first_mean ? 0 : 1;
}
