#pragma once
// Progress reporting for long commands: a one-line bar on a terminal (rewritten in place with
// '\r'), plain log lines when the output is a file or a pipe (CI logs, nohup), and a CSV log.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/train/checkpoint.hpp"

namespace difftrain::tools {

/// "1:02:03" / "02:03" for a duration in seconds.
inline std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e8) return "--:--";
  const auto s = static_cast<std::int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  return buf;
}

/// What one line of progress shows.
struct ProgressState {
  std::int64_t step = 0, total = 0;
  double loss = 0, lr = 0, it_per_s = 0;
};

/// Step/total, loss, lr, it/s and ETA; a bar on a TTY, a log line every `log_every` steps (and
/// on the first and last) otherwise. A null `out` prints nothing (ranks other than 0).
class ProgressReporter {
 public:
  explicit ProgressReporter(std::FILE* out, bool force_plain = false)
      : out_(out), tty_(out && !force_plain && isatty(fileno(out))) {}

  bool is_tty() const { return tty_; }

  void update(const ProgressState& s) {
    if (!out_) return;
    // it/s averaged since the start: single steps are noisy on a shared machine
    const auto now = std::chrono::steady_clock::now();
    if (!started_) {
      start_ = now;
      first_step_ = s.step - 1;
      started_ = true;
    }
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double done = double(s.step - first_step_);
    const double rate = elapsed > 0 ? done / elapsed : s.it_per_s;
    const double eta = rate > 0 ? double(s.total - s.step) / rate : -1;
    char line[256];
    if (tty_) {
      constexpr int width = 24;
      const int filled = s.total > 0 ? int(width * double(s.step) / double(s.total)) : 0;
      std::string bar(std::size_t(filled), '#');
      bar.resize(width, '.');
      std::snprintf(line, sizeof line, "\r[%s] %lld/%lld loss %.4f lr %.2e %.2f it/s ETA %s ",
                    bar.c_str(), static_cast<long long>(s.step), static_cast<long long>(s.total),
                    s.loss, s.lr, rate, format_duration(eta).c_str());
      std::fputs(line, out_);
      if (s.step >= s.total) std::fputc('\n', out_);
    } else {
      const std::int64_t every = std::max<std::int64_t>(1, s.total / 100);
      if (s.step == first_step_ + 1 || s.step % every == 0 || s.step >= s.total) {
        std::snprintf(line, sizeof line, "step %lld/%lld loss %.6f lr %.3e %.2f it/s ETA %s\n",
                      static_cast<long long>(s.step), static_cast<long long>(s.total), s.loss, s.lr,
                      rate, format_duration(eta).c_str());
        std::fputs(line, out_);
      }
    }
    std::fflush(out_);
  }

  /// Ends a bar line before other output.
  void message(const std::string& text) {
    if (!out_) return;
    if (tty_) std::fputc('\n', out_);
    std::fputs((text + "\n").c_str(), out_);
    std::fflush(out_);
  }

 private:
  std::FILE* out_;
  bool tty_;
  bool started_ = false;
  std::int64_t first_step_ = 0;
  std::chrono::steady_clock::time_point start_;
};

/// CSV of step, loss, lr, grad norm (and whether the step was skipped), appended to on resume.
class CsvLog {
 public:
  CsvLog() = default;
  CsvLog(const std::filesystem::path& path, bool append) {
    const bool fresh = !append || !std::filesystem::exists(path);
    file_.open(path, fresh ? std::ios::out | std::ios::trunc : std::ios::out | std::ios::app);
    require(file_.good(), "CsvLog", "cannot open '", path.string(), "' for writing");
    if (fresh) file_ << "step,loss,lr,grad_norm,skipped\n";
  }
  void write(std::int64_t step, double loss, double lr, double grad_norm, bool skipped) {
    if (!file_.is_open()) return;
    char line[160];
    std::snprintf(line, sizeof line, "%lld,%.9g,%.9g,%.9g,%d\n", static_cast<long long>(step), loss,
                  lr, grad_norm, skipped ? 1 : 0);
    file_ << line;
    file_.flush();
  }

 private:
  std::ofstream file_;
};

/// Ctrl-C (SIGINT) and SIGTERM set a flag that a loop polls at step boundaries, so that it can
/// save a checkpoint and exit cleanly; the previous handlers are restored on destruction. A
/// second Ctrl-C kills (the default action), for a loop that does not poll, except while a
/// checkpoint is being saved (train::checkpoint_saves_in_progress): then it is ignored, with a
/// message, so that the save the first Ctrl-C asked for completes.
class InterruptGuard {
 public:
  InterruptGuard() {
    flag().store(false);
    previous_int_ = std::signal(SIGINT, &InterruptGuard::handle);
    previous_term_ = std::signal(SIGTERM, &InterruptGuard::handle);
  }
  ~InterruptGuard() {
    std::signal(SIGINT, previous_int_);
    std::signal(SIGTERM, previous_term_);
  }
  InterruptGuard(const InterruptGuard&) = delete;
  InterruptGuard& operator=(const InterruptGuard&) = delete;

  bool interrupted() const { return flag().load(); }
  /// The flag itself (tests set it to simulate Ctrl-C).
  static std::atomic<bool>& flag() {
    static std::atomic<bool> f{false};
    return f;
  }

 private:
  // The handler stays installed (glibc's signal() keeps it) and decides at the second signal,
  // rather than restoring SIG_DFL at the first, so that it can spare a save in progress. It
  // only touches lock-free atomics and calls async-signal-safe functions.
  static void handle(int sig) {
    if (!flag().exchange(true)) return;  // the first: the loop saves and stops
    if (train::checkpoint_saves_in_progress.load() > 0) {
      static constexpr char text[] =
          "\ndifftrain: second interrupt ignored while a checkpoint is being saved; the run stops "
          "once it is complete (SIGKILL stops it now)\n";
      [[maybe_unused]] const ssize_t n = ::write(STDERR_FILENO, text, sizeof text - 1);
      return;
    }
    std::signal(sig, SIG_DFL);
    std::raise(sig);  // delivered when the handler returns: the default action, as before
  }
  using Handler = void (*)(int);
  Handler previous_int_ = SIG_DFL, previous_term_ = SIG_DFL;
};

}  // namespace difftrain::tools
