// A minimal test harness: FF_TEST registers a case, FF_CHECK records a failure and goes on,
// run_all() returns the process exit code (0 pass, 1 fail).
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace fftest {

struct Case {
  const char* name;
  std::function<void()> fn;
};
inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}
inline int& failures() {
  static int n = 0;
  return n;
}
struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline int run_all() {
  int failed_cases = 0;
  for (const Case& c : registry()) {
    const int before = failures();
    c.fn();
    const bool ok = failures() == before;
    failed_cases += !ok;
    std::printf("[%s] %s\n", ok ? "PASS" : "FAIL", c.name);
  }
  std::printf("%zu cases, %d failed\n", registry().size(), failed_cases);
  return failed_cases == 0 && !registry().empty() ? 0 : 1;
}

}  // namespace fftest

#define FF_CONCAT_(a, b) a##b
#define FF_CONCAT(a, b) FF_CONCAT_(a, b)
#define FF_TEST(name)                                                         \
  static void name();                                                         \
  static ::fftest::Register FF_CONCAT(ff_register_, name)(#name, &name);      \
  static void name()
#define FF_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) {                                                            \
      ++::fftest::failures();                                                 \
      std::printf("  %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                         \
  } while (0)
