// A user's own denoiser and schedule (custom_schedule.hpp) trained by train::Trainer.
#include "custom_schedule.hpp"

#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  const std::int64_t steps = argc > 1 ? std::atoll(argv[1]) : 300;
  if (steps < 20) {
    std::fprintf(stderr, "custom_schedule: steps is %lld, expected at least 20\n",
                 static_cast<long long>(steps));
    return 2;
  }
  const std::vector<double> losses = custom::train(steps);
  double first = 0, last = 0;
  for (std::size_t i = 0; i < 10; ++i)
    first += losses[i] / 10, last += losses[losses.size() - 1 - i] / 10;
  std::printf("mean loss of the first 10 steps %.4f, of the last 10 %.4f\n", first, last);
  return last < first ? 0 : 1;
}
