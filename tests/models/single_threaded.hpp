#pragma once
// RAII: runs a scope on one OpenMP thread. The model tests make many forwards of tiny models,
// where parallel regions cost more than they save (much more on a loaded machine); results do
// not depend on the thread count (the nn layers' own tests check that), and one golden case
// keeps the default thread count.

#ifdef _OPENMP
#include <omp.h>
#endif

namespace difftrain::test {

struct SingleThreaded {
#ifdef _OPENMP
  int saved = omp_get_max_threads();
  SingleThreaded() { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(saved); }
  SingleThreaded(const SingleThreaded&) = delete;
  SingleThreaded& operator=(const SingleThreaded&) = delete;
#endif
};

}  // namespace difftrain::test
