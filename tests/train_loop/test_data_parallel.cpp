// The Trainer's data parallelism (Trainer::set_collective) without MPI: two ranks as two threads
// sharing memory (this file's ThreadCollective), so the sanitizer builds check it too. A least
// squares model whose gradient is a weighted sum over rows: two ranks × their shards follow the
// one-process run on the whole micro-batches, including shards of 2 and 1 rows and empty ones;
// rank 1's different start is replaced by rank 0's; one rank's error reaches both.
#include <barrier>
#include <catch2/catch.hpp>
#include <cmath>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "difftrain/train/trainer.hpp"

using namespace difftrain;

namespace data_parallel_test {

// Ranks 0 … size−1 as threads: each call publishes the rank's buffer, waits for all, combines
// in rank order (the same sums on every rank), waits again before anyone changes its buffer.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), sync_(size), slots_(std::size_t(size)) {}
  int size() const { return size_; }
  void wait() { sync_.arrive_and_wait(); }
  const void*& slot(int rank) { return slots_[std::size_t(rank)]; }
  std::optional<std::string>& error(int rank) { return errors_[std::size_t(rank)]; }

 private:
  int size_;
  std::barrier<> sync_;
  std::vector<const void*> slots_;
  std::vector<std::optional<std::string>> errors_ = std::vector<std::optional<std::string>>(8);
};

class ThreadCollective final : public train::Collective {
 public:
  ThreadCollective(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size(); }
  void allreduce_sum(std::span<float> x) override { reduce(x); }
  void allreduce_sum(std::span<double> x) override { reduce(x); }
  void broadcast(std::span<float> x, int root) override {
    bytes_ += x.size_bytes();
    group_.slot(rank_) = x.data();
    group_.wait();
    const std::vector<float> from(static_cast<const float*>(group_.slot(root)),
                                  static_cast<const float*>(group_.slot(root)) + x.size());
    group_.wait();
    std::copy(from.begin(), from.end(), x.begin());
  }
  std::optional<train::RankError> agree(const std::optional<std::string>& error) override {
    group_.error(rank_) = error;
    group_.wait();
    std::optional<train::RankError> first;
    for (int r = 0; r < size() && !first; ++r)
      if (group_.error(r)) first = train::RankError{r, *group_.error(r)};
    group_.wait();
    return first;
  }
  void barrier() override { group_.wait(); }
  std::size_t bytes_reduced() const override { return bytes_; }

 private:
  template <class T>
  void reduce(std::span<T> x) {
    bytes_ += x.size_bytes();
    group_.slot(rank_) = x.data();
    group_.wait();
    std::vector<T> sum(x.size(), T(0));
    for (int r = 0; r < size(); ++r) {
      const T* v = static_cast<const T*>(group_.slot(r));
      for (std::size_t i = 0; i < x.size(); ++i) sum[i] += v[i];
    }
    group_.wait();
    std::copy(sum.begin(), sum.end(), x.begin());
  }

  ThreadGroup& group_;
  int rank_;
  std::size_t bytes_ = 0;
};

constexpr std::size_t kDim = 3, kPoints = 7;

// Point i: x_i = (1, sin i, cos 2i), y_i = 2 − i/3.
double feature(std::size_t i, std::size_t d) {
  return d == 0 ? 1.0 : d == 1 ? std::sin(double(i)) : std::cos(2.0 * double(i));
}
double label(std::size_t i) { return 2.0 - double(i) / 3.0; }

struct Linear {
  nn::Parameter<float> w{{kDim}};
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit(nn::join_name(prefix, "w"), w);
  }
};

// L = (1/b)·Σ_r w_r·(w·x_r − y_r)² over the batch's rows; images[r,0,0,0] holds the point index.
struct LeastSquaresStep {
  Linear& m;
  TrainStepResult step(const Tensor4<float>& images, const TokenIds&, std::uint64_t,
                       const BatchExtras& extras) {
    const std::size_t b = images.shape()[0];
    TrainStepResult out;
    for (std::size_t r = 0; r < b; ++r) {
      const auto i = std::size_t(images(r, 0, 0, 0));
      const double w = extras.sample_weights.empty() ? 1.0 : extras.sample_weights[r];
      double e = -label(i);
      for (std::size_t d = 0; d < kDim; ++d) e += m.w.value(d) * feature(i, d);
      out.loss += w * e * e / double(b);
      for (std::size_t d = 0; d < kDim; ++d)
        m.w.grad(d) += float(2.0 * w * e * feature(i, d) / double(b));
    }
    return out;
  }
};

// Global micro-batch m: n = 1 + m mod 3 rows, points (3m + j) mod 7; rank r of R takes rows
// ⌊r·n/R⌋ … ⌊(r+1)·n/R⌋ − 1 (R = 0: the whole batch, unsharded).
train::TrainBatch micro_batch(std::uint64_t m, int rank, int ranks, int failing_rank = -1) {
  const std::size_t n = 1 + m % 3;
  const std::size_t lo = ranks ? std::size_t(rank) * n / std::size_t(ranks) : 0;
  const std::size_t hi = ranks ? std::size_t(rank + 1) * n / std::size_t(ranks) : n;
  require(!(rank == failing_rank && m == 4), "data", "rank ", rank, ": image 9 cannot be read");
  train::TrainBatch batch;
  batch.images = Tensor4<float>(std::array<std::size_t, 4>{hi - lo, 1, 1, 1});
  batch.token_ids = TokenIds(std::array<std::size_t, 2>{hi - lo, 1}, 0);
  for (std::size_t j = lo; j < hi; ++j) {
    batch.images(j - lo, 0, 0, 0) = float((3 * m + j) % kPoints);
    if (ranks) batch.global_rows.push_back(j);
  }
  if (ranks) batch.global_batch_size = n;
  return batch;
}

train::TrainerOptions options() {
  train::TrainerOptions o;
  o.optimizer = "adamw";
  o.learning_rate = 0.05;
  o.lr_warmup_steps = 0;
  o.max_train_steps = 6;
  o.gradient_accumulation_steps = 2;
  o.max_grad_norm = 1.0;
  o.use_ema = true;
  return o;
}

}  // namespace data_parallel_test

using namespace data_parallel_test;

TEST_CASE("two ranks as threads follow the one-process run", "[trainer][data_parallel]") {
  Linear alone;
  alone.w.value(0) = 0.5f;
  LeastSquaresStep alone_step{alone};
  train::Trainer one(alone_step, alone, options());
  std::vector<double> losses;
  for (int s = 0; s < 6; ++s)
    losses.push_back(one.train_step([](std::uint64_t m) { return micro_batch(m, 0, 0); }).loss);

  ThreadGroup group(2);
  Linear models[2];
  models[0].w.value(0) = 0.5f;
  models[1].w.value(0) = -3.0f;  // replaced by rank 0's start
  std::vector<double> rank_losses[2];
  std::vector<std::size_t> sent(2);
  auto rank_main = [&](int rank) {
    ThreadCollective collective(group, rank);
    LeastSquaresStep step{models[rank]};
    train::Trainer trainer(step, models[rank], options());
    trainer.set_collective(&collective);
    for (int s = 0; s < 6; ++s)
      rank_losses[rank].push_back(
          trainer.train_step([rank](std::uint64_t m) { return micro_batch(m, rank, 2); }).loss);
    trainer.ema()->copy_to();
    sent[std::size_t(rank)] = collective.bytes_reduced();
  };
  std::thread other(rank_main, 1);
  rank_main(0);
  other.join();
  one.ema()->copy_to();

  for (std::size_t d = 0; d < kDim; ++d) {
    CHECK(models[0].w.value(d) == models[1].w.value(d));  // the ranks stay identical
    CHECK(models[0].w.value(d) == Approx(alone.w.value(d)).epsilon(1e-5));
  }
  CHECK(std::abs(alone.w.value(0) - 0.5f) > 0.1f);  // it trained
  for (int s = 0; s < 6; ++s) {
    CHECK(rank_losses[0][std::size_t(s)] == rank_losses[1][std::size_t(s)]);
    CHECK(rank_losses[0][std::size_t(s)] == Approx(losses[std::size_t(s)]).epsilon(1e-5));
  }
  // The start (3 floats), then per step the gradient (3 floats) and 2 doubles of loss and status.
  CHECK(sent[0] == 3 * sizeof(float) + 6 * (3 * sizeof(float) + 2 * sizeof(double)));
}

TEST_CASE("one rank's error stops both ranks at the same step", "[trainer][data_parallel]") {
  ThreadGroup group(2);
  Linear models[2];
  std::string errors[2];
  std::int64_t steps[2] = {};
  auto rank_main = [&](int rank) {
    ThreadCollective collective(group, rank);
    LeastSquaresStep step{models[rank]};
    train::Trainer trainer(step, models[rank], options());
    trainer.set_collective(&collective);
    try {
      for (int s = 0; s < 6; ++s)
        trainer.train_step([rank](std::uint64_t m) { return micro_batch(m, rank, 2, 1); });
    } catch (const Error& e) {
      errors[rank] = e.what();
    }
    steps[rank] = trainer.global_step();
  };
  std::thread other(rank_main, 1);
  rank_main(0);
  other.join();
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK_THAT(errors[r], Catch::Contains("rank 1 of 2 failed at global step 3") &&
                              Catch::Contains("image 9 cannot be read"));
    CHECK(steps[r] == 2);
  }
  CHECK(models[0].w.value(1) == models[1].w.value(1));
}

TEST_CASE("a shard that is not one is refused with several ranks", "[trainer][data_parallel]") {
  ThreadGroup group(1);
  ThreadCollective alone(group, 0);
  Linear model;
  LeastSquaresStep step{model};
  train::Trainer trainer(step, model, options());
  trainer.set_collective(&alone);  // one rank: whole batches are its shard
  CHECK_NOTHROW(trainer.train_step([](std::uint64_t m) { return micro_batch(m, 0, 0); }));
  train::TrainBatch wrong = micro_batch(0, 1, 2);
  wrong.global_rows = {5};
  CHECK_THROWS_WITH(train::compose_batch(wrong, false, 1.0, 1),
                    Catch::Contains("global row 5 is outside the global batch of 1"));
}
