#pragma once
// A non-owning reference to a callable, so that a function taking a visitor can be compiled once
// instead of once per lambda (the models' parameter walks are instantiated in src/).

#include <memory>
#include <type_traits>
#include <utility>

namespace difftrain {

template <class Signature>
class FunctionRef;

/// Calls the referenced callable, which must outlive the FunctionRef (pass it down, never store).
template <class R, class... Args>
class FunctionRef<R(Args...)> {
 public:
  template <class F>
  requires(!std::is_same_v<std::remove_cvref_t<F>, FunctionRef> &&
           std::is_invocable_r_v<R, F&, Args...>) FunctionRef(F&& f)
  noexcept  // NOLINT(google-explicit-constructor): used as a parameter type
      : object_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* object, Args... args) -> R {
          return (*static_cast<std::remove_reference_t<F>*>(object))(std::forward<Args>(args)...);
        }) {}

  R operator()(Args... args) const { return call_(object_, std::forward<Args>(args)...); }

 private:
  void* object_;
  R (*call_)(void*, Args...);
};

}  // namespace difftrain
