// Tuning knobs read from the environment by the kernels' planners (never by argument checks).
#pragma once

#include <cstdint>
#include <cstdlib>

namespace liftplus_fast {
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
}  // namespace liftplus_fast
