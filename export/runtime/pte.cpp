// Operator-table check of a .pte (ExecuTorch program flatbuffer, schema/program.fbs) that the loader leaves out.
//
// ExecuTorch 1.5.1's Method::init resolves every kernel call's operator but keeps only the last instruction's
// error: an out-of-range operator index (or an unreadable operator name) in any earlier instruction is forgotten,
// its kernel slot stays null, and the first execute() jumps to address 0 (SIGSEGV). A .pte with a few altered
// bytes does this. Program verification (InternalConsistency) only checks the flatbuffer's structure, not these
// indices, so the runtime walks the instruction tables itself before any method loads. The same walk then hands
// the program to xnnpack.cpp, which checks each XNNPACK delegate's payload (a graph XNNPACK trusts unchecked).
#include "pte.h"

#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "errors.h"
#include "xnnpack.h"

namespace cosmoes {
namespace {

// Field ids from schema/program.fbs (a union takes two ids: its type, then its value).
constexpr int kProgramExecutionPlan = 1;
constexpr int kPlanName = 0, kPlanChains = 5, kPlanOperators = 6;
constexpr int kChainInstructions = 2;
constexpr int kInstructionArgsType = 0, kInstructionArgs = 1;
constexpr uint8_t kKernelCall = 1;  // InstructionArguments: NONE = 0, KernelCall = 1, ...
constexpr int kKernelCallOpIndex = 0;
constexpr int kOperatorName = 0, kOperatorOverload = 1;
constexpr size_t kOperatorNameBuffer = 100;  // Method::resolve_operator's kTempBufferSizeForName

// The flatbuffer part of the file: the extended header ("eh00" at byte 8) gives its size.
std::vector<uint8_t> read_flatbuffer(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw Error("cannot read " + path);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  std::vector<uint8_t> head(24, 0);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error("cannot read " + path);
  size_t got = std::fread(head.data(), 1, head.size(), f);
  uint64_t program_size = 0;
  for (int k = 7; k >= 0; --k) program_size = (program_size << 8) | head[16 + k];
  if (got < head.size() || program_size < head.size() || program_size > size) {
    std::fclose(f);
    throw Error(path + " is a corrupt ExecuTorch program: its header gives a program of " +
                std::to_string(program_size) + " bytes in a file of " + std::to_string(size));
  }
  std::vector<uint8_t> bytes(program_size);
  std::rewind(f);
  got = std::fread(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  if (got != bytes.size()) throw Error("cannot read " + path);
  return bytes;
}

// Every kernel call of one execution plan names an operator of its table whose name ExecuTorch can resolve.
void check_plan(Flat& fb, uint64_t plan) {
  const std::string name = fb.string(plan, kPlanName);
  uint64_t ops_at = fb.field(plan, kPlanOperators), chains_at = fb.field(plan, kPlanChains);
  uint64_t ops = ops_at ? fb.follow(ops_at) : 0, n_ops = ops ? fb.length(ops) : 0;
  if (!chains_at) return;
  uint64_t chains = fb.follow(chains_at);
  for (uint64_t c = 0; c < fb.length(chains); ++c) {
    uint64_t chain = fb.element(chains, c), instr_at = fb.field(chain, kChainInstructions);
    if (!instr_at) continue;
    uint64_t instructions = fb.follow(instr_at);
    for (uint64_t i = 0; i < fb.length(instructions); ++i) {
      fb.visit();
      uint64_t instruction = fb.element(instructions, i), type_at = fb.field(instruction, kInstructionArgsType);
      uint64_t args_at = fb.field(instruction, kInstructionArgs);
      if (!type_at || fb.read(type_at, 1) != kKernelCall || !args_at) continue;
      uint64_t call = fb.follow(args_at), op_at = fb.field(call, kKernelCallOpIndex);
      int64_t op = op_at ? static_cast<int32_t>(fb.read(op_at, 4)) : 0;
      const std::string where = "method " + name + " instruction " + std::to_string(i);
      if (op < 0 || static_cast<uint64_t>(op) >= n_ops)
        fb.fail(where + " calls operator " + std::to_string(op) + " of " + std::to_string(n_ops));
      uint64_t entry = fb.element(ops, static_cast<uint64_t>(op));
      // as populate_operator_name builds it: "name" or "name.overload" (when the stored overload is not empty)
      int64_t base = fb.c_length(entry, kOperatorName), overload = fb.c_length(entry, kOperatorOverload);
      int64_t full = base + (fb.stored_length(entry, kOperatorOverload) > 0 ? 1 + overload : 0);
      if (base < 0 || full >= static_cast<int64_t>(kOperatorNameBuffer))
        fb.fail(where + " calls an operator without a usable name");
    }
  }
}

}  // namespace

void check_operator_table(const std::string& path) {
  Flat fb(read_flatbuffer(path), path);
  uint64_t plans = fb.target(fb.root(), kProgramExecutionPlan);
  for (uint64_t p = 0; plans && p < fb.length(plans); ++p) {
    fb.visit();
    check_plan(fb, fb.element(plans, p));
  }
  check_xnnpack_delegates(fb, path);
}

}  // namespace cosmoes
