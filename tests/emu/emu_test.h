// A minimal test harness for the emulator's C++ tests: EMU_TEST(name) { ... } registers a case,
// CHECK* throw on failure, main() runs every case and prints PASS/FAIL lines (exit 1 on failure).
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu_test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& cases() {
  static std::vector<Case> c;
  return c;
}

struct Register {
  Register(const char* name, void (*fn)()) { cases().push_back({name, fn}); }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string at(const char* file, int line) {
  return std::string(file) + ":" + std::to_string(line) + ": ";
}

// Runs `f`, which must throw std::runtime_error whose message contains every one of `parts`;
// returns the message.
inline std::string expect_error(const std::function<void()>& f, std::vector<std::string> parts,
                                const std::string& where) {
  try {
    f();
  } catch (const Failure&) {
    throw;
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) {
      if (msg.find(p) == std::string::npos) {
        throw Failure(where + "error message lacks '" + p + "': " + msg);
      }
    }
    return msg;
  }
  throw Failure(where + "expected an error, none was raised");
}

}  // namespace emu_test

#define EMU_TEST(name)                                          \
  static void name();                                           \
  static emu_test::Register register_##name(#name, &name);      \
  static void name()

#define CHECK(cond)                                                                      \
  do {                                                                                   \
    if (!(cond)) throw emu_test::Failure(emu_test::at(__FILE__, __LINE__) + #cond);      \
  } while (0)

#define CHECK_EQ(a, b)                                                                   \
  do {                                                                                   \
    const auto va_ = (a);                                                                \
    const auto vb_ = (b);                                                                \
    if (!(va_ == vb_)) {                                                                 \
      throw emu_test::Failure(emu_test::at(__FILE__, __LINE__) + #a " == " #b ": " +     \
                              std::to_string(va_) + " vs " + std::to_string(vb_));       \
    }                                                                                    \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                            \
  do {                                                                                   \
    const double va_ = (a), vb_ = (b);                                                   \
    if (!(std::fabs(va_ - vb_) <= (tol))) {                                              \
      throw emu_test::Failure(emu_test::at(__FILE__, __LINE__) + #a " ~ " #b ": " +      \
                              std::to_string(va_) + " vs " + std::to_string(vb_));       \
    }                                                                                    \
  } while (0)

// CHECK_ERROR(statement, "part", ...): the statement throws std::runtime_error mentioning each part.
#define CHECK_ERROR(stmt, ...) \
  emu_test::expect_error([&] { stmt; }, {__VA_ARGS__}, emu_test::at(__FILE__, __LINE__))

int main(int argc, char** argv) {
  int failed = 0;
  for (const auto& c : emu_test::cases()) {
    if (argc > 1 && std::string(argv[1]) != c.name) continue;
    try {
      c.fn();
      std::printf("PASS %s\n", c.name);
    } catch (const std::exception& e) {
      std::printf("FAIL %s: %s\n", c.name, e.what());
      ++failed;
    }
    std::fflush(stdout);
  }
  return failed == 0 ? 0 : 1;
}
