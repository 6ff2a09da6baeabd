// cosmoes_int4_check: the int4 kernels on their own, for the tests (bit-identical to cosmoes/int4.py) and to time
// them against the bytes they read.
//   cosmoes_int4_check run DIR                      DIR/shape.txt (rows cols in group N), nibbles.bin, scales.bin,
//                                                   x.bin (fp32 N x in) -> DIR/y.bin (fp32 N x rows)
//   cosmoes_int4_check silu DIR                     DIR/a.bin, b.bin (fp32, same length) -> DIR/h.bin = silu(a) * b
//   cosmoes_int4_check bench ROWS COLS GROUP N ITERS   microseconds per call and GB/s of weights read
// Both print the kernel family first (COSMOES_ISA caps it).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "errors.h"
#include "int4.h"

namespace {

template <typename T>
std::vector<T> read_all(const std::string& path, size_t count) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (bytes.size() != count * sizeof(T)) throw cosmoes::Error(path + ": wrong size");
  std::vector<T> out(count);
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(out.data()));
  return out;
}

int run(const std::string& dir) {
  int64_t rows, cols, in, group, N;
  std::ifstream shape(dir + "/shape.txt");
  if (!(shape >> rows >> cols >> in >> group >> N)) throw cosmoes::Error(dir + "/shape.txt: unreadable");
  const int64_t stored = cosmoes::int4::stored_rows(rows);
  auto nib = read_all<uint8_t>(dir + "/nibbles.bin", stored * cols / 2);
  auto sc = read_all<float>(dir + "/scales.bin", cols / group * stored);
  auto x = read_all<float>(dir + "/x.bin", N * in);
  std::vector<int8_t> q(N * cols);
  std::vector<float> sa(N), y(N * rows);
  cosmoes::int4::quantize(x.data(), N, in, cols, q.data(), sa.data());
  cosmoes::int4::linear({nib.data(), sc.data(), rows, cols, group}, q.data(), sa.data(), N, y.data(), 0, rows);
  std::ofstream(dir + "/y.bin", std::ios::binary).write(reinterpret_cast<const char*>(y.data()), y.size() * 4);
  return 0;
}

int silu(const std::string& dir) {
  std::ifstream f(dir + "/a.bin", std::ios::binary | std::ios::ate);
  const auto n = static_cast<size_t>(f.tellg()) / 4;
  auto a = read_all<float>(dir + "/a.bin", n), b = read_all<float>(dir + "/b.bin", n);
  std::vector<float> h(n);
  cosmoes::int4::silu_mul(a.data(), b.data(), h.data(), static_cast<int64_t>(n));
  std::ofstream(dir + "/h.bin", std::ios::binary).write(reinterpret_cast<const char*>(h.data()), h.size() * 4);
  return 0;
}

int bench(int64_t rows, int64_t cols, int64_t group, int64_t N, int64_t iters) {
  std::mt19937 rng(0);
  const int64_t stored = cosmoes::int4::stored_rows(rows);
  std::vector<uint8_t> nib(stored * cols / 2);
  for (auto& b : nib) b = static_cast<uint8_t>(rng());
  std::vector<float> sc(cols / group * stored, 0.01f), x(N * cols), y(N * rows), sa(N);
  for (auto& v : x) v = static_cast<float>(rng() % 2001) / 1000.f - 1.f;
  std::vector<int8_t> q(N * cols);
  cosmoes::int4::Matrix w{nib.data(), sc.data(), rows, cols, group};
  auto once = [&] {
    cosmoes::int4::quantize(x.data(), N, cols, cols, q.data(), sa.data());
    cosmoes::int4::linear(w, q.data(), sa.data(), N, y.data(), 0, rows);
  };
  for (int i = 0; i < 3; ++i) once();
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) once();
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iters;
  double bytes = static_cast<double>(nib.size() + sc.size() * 4);
  std::printf("%.2f us/call %.2f GB/s\n", us, bytes / us / 1e3);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::printf("isa %s\n", cosmoes::int4::isa_name(cosmoes::int4::active_isa()));
    std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "run" && argc == 3) return run(argv[2]);
    if (cmd == "silu" && argc == 3) return silu(argv[2]);
    if (cmd == "bench" && argc == 7)
      return bench(std::stoll(argv[2]), std::stoll(argv[3]), std::stoll(argv[4]), std::stoll(argv[5]),
                   std::stoll(argv[6]));
    std::fprintf(stderr, "usage: cosmoes_int4_check run DIR | silu DIR | bench ROWS COLS GROUP N ITERS\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
