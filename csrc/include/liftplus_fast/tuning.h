// Tuning knobs read from the environment by the kernels' planners (never by argument checks).
#pragma once

#include <cstdint>
#include <cstdlib>
#include "liftplus_fast/cpu_capability.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace tuning {

// A non-negative integer from the environment, or `fallback` when unset or malformed.
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  return (end != v && x >= 0) ? static_cast<int64_t>(x) : fallback;
}

}  // namespace tuning
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
