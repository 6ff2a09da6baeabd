// Validator of the XNNPACK delegate payloads of a .pte, run (from pte.cpp) before any method of the program loads.
//
// Why: ExecuTorch 1.5.1's XNNPACK backend (backends/xnnpack/runtime/XNNCompiler.cpp) checks a payload's header
// offsets and verifies its flatbuffer's structure, then builds an XNNPACK subgraph from what the graph says, and
// XNNPACK trusts it: a tensor's dims say how many bytes of its constant data are read (an entry holding fewer makes
// xnn_create_fully_connected_nc_f32 read past the mapped file: SIGBUS), dims size the tensors xnn_plan_memory lays
// out (absurd ones keep it busy for minutes), an external value's id indexes the delegate call's arguments
// unchecked, and a few fields are dereferenced without a null check (a union type whose value is absent, a
// per-channel scale vector, a blockwise tensor's first two dims) or divided by (a group size). A .pte whose payload
// bytes were altered (its manifest size and sha256 rewritten to match) reaches all of these, so this file walks
// every payload with pte.cpp's bounds-checked reader and refuses such a program with one cosmoes::Error.
//
// Layouts (from the executorch wheel's backends/xnnpack/serialization/): a payload starts with an XNNHeader ("XH00"
// at byte 4; uint32 flatbuffer offset at 10 and size at 14, uint32 constant data offset at 18, uint64 constant data
// size at 22), or is one flatbuffer when the magic is absent. The flatbuffer is an XNNGraph (runtime_schema.fbs,
// identifier XN00 or XN01). A constant is an offset + size into the constant data after the flatbuffer, or a
// named_key into the program's named data (program.fbs NamedData -> segments): XNNPACK gets that whole segment.
#include "xnnpack.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>

namespace cosmoes {
namespace {

// program.fbs field ids (a union takes two ids: its type, then its value)
constexpr int kProgramPlans = 1, kProgramDelegateData = 3, kProgramSegments = 4, kProgramNamedData = 7;
constexpr int kPlanName = 0, kPlanValues = 2, kPlanChains = 5, kPlanDelegates = 7, kChainInstructions = 2;
constexpr uint8_t kEValueTensor = 5;  // KernelTypes: Null = 1, Int, Bool, Double, Tensor, ...
constexpr int kEValueType = 0, kEValue = 1, kTensorSizes = 2;
constexpr int kInstructionType = 0, kInstruction = 1, kCallDelegate = 0, kCallArgs = 1;
constexpr uint8_t kDelegateCall = 2;  // InstructionArguments: KernelCall = 1, DelegateCall = 2, ...
constexpr int kDelegateId = 0, kDelegateProcessed = 1, kReferenceLocation = 0, kReferenceIndex = 1;
constexpr uint8_t kSegment = 1;  // DataLocation: INLINE = 0, SEGMENT = 1

// runtime_schema.fbs (XNNGraph) field ids
constexpr int kGraphNodes = 1, kGraphValues = 2, kGraphExterns = 3, kGraphConstantBuffer = 6, kGraphConstantData = 8;
constexpr uint8_t kTensorValue = 1, kQuantizedTensorValue = 2;
constexpr int kTensorDatatype = 0, kTensorDims = 2, kTensorConstant = 3, kTensorExternal = 4, kTensorFlags = 5,
              kTensorIdOut = 6;
constexpr uint8_t kPerChannel = 1, kPerTensor = 2, kPerToken = 3, kPerChannelGroup = 4;  // XNNQuantParams

constexpr uint32_t kInvalidId = 0xFFFFFFFF;        // XNN_INVALID_VALUE_ID
constexpr uint64_t kExternalFlags = 0x3;           // XNN_VALUE_FLAG_EXTERNAL_INPUT | XNN_VALUE_FLAG_EXTERNAL_OUTPUT
constexpr uint64_t kMaxDims = 6;                   // XNN_MAX_TENSOR_DIMS
constexpr uint64_t kMaxExterns = 4096;             // XNNCompiler's own bound
constexpr uint64_t kMaxTensorBytes = uint64_t{1} << 34;  // 16 GiB: no tensor of a model this runtime serves is near
constexpr uint64_t kMaxWindow = uint64_t{1} << 16;       // paddings, kernels, strides, dilations, channels
constexpr uint64_t kHeaderSize = 30;                     // XNNHeader::kMinSize
// Bits per element of XNNDatatype 1..14 (fp32 fp16 qint8 quint8 qint32 qcint8 qcint32 qcint4 qdint8 qbint4 qpint8
// int32 pfp32 bf16); 0 is invalid.
constexpr uint32_t kBits[] = {0, 32, 16, 8, 8, 32, 8, 32, 4, 8, 4, 8, 32, 32, 16};

// Per XNodeUnion type (1-based, schema order): the fields of the node's table that hold the ids of the values it
// reads and writes, and which shape-making parameters XNNPACK takes from the node itself rather than a tensor.
enum Shape : uint8_t { kPlain, kTranspose, kResize, kPad, kReshape, kSlice, kConv, kDepthwise, kPool, kArgMax };
struct Layout {
  uint8_t n_in;
  int8_t in[5];
  uint8_t n_out;
  int8_t out[2];
  Shape shape;
};
constexpr Layout k2x1{2, {0, 1}, 1, {2}, kPlain}, k1x1{1, {0}, 1, {1}, kPlain}, kScalar1x1{1, {1}, 1, {2}, kPlain};
constexpr Layout kStatic{1, {2}, 1, {3}, kPlain};  // XNNStaticTranspose/ResizeBilinear2D/Reshape: input 2, output 3
constexpr Layout kPool2d{1, {10}, 1, {11}, kPool};  // _XNNPooling2D
constexpr Layout kConvLayout{3, {15, 16, 17}, 1, {18}, kConv};  // _XNNNodeConv: input, filter, bias; output
constexpr Layout kLayouts[] = {
    {},                                        // 0: NONE
    k2x1,                                      // XNNAdd
    {3, {0, 1, 2}, 1, {3}, kPlain},            // XNNFullyConnected: input, filter, bias (may be invalid); output
    k1x1, k1x1,                                // XNNSoftmax, XNNSigmoid
    {1, {2}, 1, {3}, kTranspose},              // XNNStaticTranspose
    k1x1, kConvLayout, k2x1,                   // XNNClamp, XNNConv2d, XNNDiv
    {1, {2}, 1, {3}, kResize},                 // XNNStaticResizeBilinear2D
    {1, {3}, 1, {4}, kPad},                    // XNNStaticConstantPad
    kPool2d, k2x1,                             // XNNAvgPooling2d, XNNMinimum
    {3, {15, 16, 17}, 1, {18}, kDepthwise},    // XNNDepthwiseConv2d
    kPool2d, k2x1, k2x1, k1x1, k1x1, k1x1,     // MaxPooling2d, Multiply, Subtract, Floor, Convert, GlobalAvgPooling2d
    {1, {2}, 1, {3}, kReshape},                // XNNStaticReshape
    {1, {6}, 2, {7, 8}, kArgMax},              // XNNArgMaxPooling2d: input; values, indices
    k1x1, k1x1, k1x1, kScalar1x1, k2x1,        // XNNSquareRoot, XNNCeiling, XNNHardswish, XNNLeakyReLU, XNNMaximum
    k1x1, k1x1, kScalar1x1, k1x1, k2x1,        // XNNNegate, XNNSquare, XNNELU, XNNAbs, XNNPReLU
    {2, {1, 2}, 1, {5}, kPlain},               // XNNConcatenate2 (_XNNCat: inputs 1-4 and 7, output 5)
    {3, {1, 2, 3}, 1, {5}, kPlain},            // XNNConcatenate3
    {4, {1, 2, 3, 4}, 1, {5}, kPlain},         // XNNConcatenate4
    {1, {3}, 1, {4}, kSlice},                  // XNNStaticSlice
    {5, {0, 1, 2, 3, 4}, 1, {5}, kPlain},      // XNNScaledDotProductAttention: query, key, value, scale, mask
    k2x1,                                      // XNNBatchMatrixMultiply
    {5, {1, 2, 3, 4, 7}, 1, {5}, kPlain},      // XNNConcatenate5
    kConvLayout,                               // XNNConvTranspose2d
    k1x1, k1x1, k1x1, k1x1, k1x1, k1x1, k1x1, k1x1,  // ReciprocalSquareRoot, Log, Gelu, Tanh, Exp, Sin, Copy, Cos
};
constexpr uint64_t kNodeTypes = sizeof(kLayouts) / sizeof(kLayouts[0]);
constexpr uint64_t kFullyConnected = 2, kConcatenate2 = 32, kConcatenate3 = 33, kConcatenate4 = 34,
                   kConcatenate5 = 38;

// a * b, saturating far above any bound checked here
uint64_t mul(uint64_t a, uint64_t b) {
  constexpr uint64_t kCap = uint64_t{1} << 62;
  return (a && b > kCap / a) ? kCap : a * b;
}

struct Tensor {
  uint64_t rank = 0, dims[kMaxDims] = {};
  uint32_t bits = 0;
  bool constant = false, input = false, computed = false;  // computed: by a node already walked
  // Bytes XNNPACK reads for these dims: 4-bit types pack two elements to a byte along each row (the exporter
  // writes [rows, columns / 2]).
  uint64_t bytes() const { return bytes_of(dims, rank); }
  uint64_t elements() const {
    uint64_t e = 1;
    for (uint64_t k = 0; k < rank; ++k) e = mul(e, dims[k]);
    return e;
  }
  uint64_t bytes_of(const uint64_t* d, uint64_t n) const {
    uint64_t rows = 1;
    for (uint64_t k = 0; k + 1 < n; ++k) rows = mul(rows, d[k]);
    uint64_t last = n ? d[n - 1] : 1;
    if (bits == 4) return mul(rows, (last + 1) / 2);
    return mul(mul(rows, last), bits / 8);
  }
};

// The .pte file: its size, segment base and reads of its segments.
class File {
 public:
  explicit File(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    struct stat st;
    if (fd_ < 0 || ::fstat(fd_, &st) != 0) throw Error("cannot read " + path);
    size_ = static_cast<uint64_t>(st.st_size);
    auto head = read(0, std::min<uint64_t>(size_, 32));
    if (head.size() == 32 && std::memcmp(head.data() + 8, "eh00", 4) == 0)
      for (int k = 7; k >= 0; --k) segment_base_ = (segment_base_ << 8) | head[24 + k];
    else
      segment_base_ = UINT64_MAX;  // no extended header: the program has no segments ExecuTorch can load
  }
  ~File() { ::close(fd_); }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  uint64_t size() const { return size_; }
  uint64_t segment_base() const { return segment_base_; }
  std::vector<uint8_t> read(uint64_t at, uint64_t n) const {
    std::vector<uint8_t> out(n);
    for (uint64_t got = 0; got < n;) {
      ssize_t r = ::pread(fd_, out.data() + got, n - got, static_cast<off_t>(at + got));
      if (r <= 0) throw Error("cannot read " + std::to_string(n) + " bytes at offset " + std::to_string(at));
      got += static_cast<uint64_t>(r);
    }
    return out;
  }

 private:
  int fd_;
  uint64_t size_ = 0, segment_base_ = 0;
};

// What the delegate's calls pass it: ExecuTorch hands XNNPACK the argument list of the instruction that calls it,
// which XNNExecutor indexes with each external value's id.
struct Calls {
  bool called = false;
  std::vector<uint64_t> elements;  // per argument, the fewest elements a call's tensor holds (0: not a tensor)
};

// What the payload checks need from the program around them.
struct Program {
  Flat& fb;
  const File& file;
  std::unordered_map<std::string, uint32_t> named;  // named data key -> segment index (the first entry per key)

  // Bytes [start, start + size) of segment `index`, in the file; refused when outside it.
  std::pair<uint64_t, uint64_t> segment(uint64_t index, const std::string& what) const {
    uint64_t segments = fb.target(fb.root(), kProgramSegments), n = segments ? fb.length(segments) : 0;
    if (index >= n) fb.fail(what + " is segment " + std::to_string(index) + " of " + std::to_string(n));
    uint64_t s = fb.element(segments, index), offset = fb.scalar(s, 0, 8), size = fb.scalar(s, 1, 8);
    uint64_t base = file.segment_base();
    if (base > file.size() || offset > file.size() - base || size > file.size() - base - offset)
      fb.fail(what + " (segment " + std::to_string(index) + ") lies outside the file");
    return {base + offset, size};
  }
};

std::string dims_text(const Tensor& t) {
  std::string s = "[";
  for (uint64_t k = 0; k < t.rank; ++k) s += (k ? ", " : "") + std::to_string(t.dims[k]);
  return s + "]";
}

// One XNNPACK graph (flatbuffer + constant data) of one delegate.
class Graph {
 public:
  Graph(Flat fb, bool has_header, uint64_t constant_size, const Program& program, const Calls& calls)
      : g_(std::move(fb)), has_header_(has_header), constant_size_(constant_size), program_(program), calls_(calls) {}

  void check() {
    uint64_t ident = g_.read(4, 4);
    if (ident != 0x30304E58 && ident != 0x31304E58) g_.fail("its XNNPACK graph is not an XN00/XN01 flatbuffer");
    root_ = g_.root();
    uint64_t values = g_.target(root_, kGraphValues), nodes = g_.target(root_, kGraphNodes);
    if (!values || !nodes) g_.fail("its XNNPACK graph has no values or no nodes");
    externs_ = g_.scalar(root_, kGraphExterns, 4);
    if (externs_ > kMaxExterns) g_.fail("its XNNPACK graph has " + std::to_string(externs_) + " external values");
    uint64_t planned = 0;  // the tensors XNNPACK computes, an upper bound of the workspace it plans
    for (uint64_t i = 0; i < g_.length(values); ++i) planned += value(g_.element(values, i), i);
    const int64_t ram = static_cast<int64_t>(::sysconf(_SC_PHYS_PAGES)) * ::sysconf(_SC_PAGE_SIZE);
    if (ram > 0 && planned > static_cast<uint64_t>(ram))
      g_.fail("its XNNPACK tensors take " + std::to_string(planned / 1000000) + " MB, more than this machine's " +
              std::to_string(ram / 1000000) + " MB of memory");
    for (uint64_t j = 0; j < g_.length(nodes); ++j) node(g_.element(nodes, j), j);
  }

 private:
  // Checks value i and returns the bytes it needs when it is not a constant.
  uint64_t value(uint64_t xvalue, uint64_t i) {
    g_.visit();
    const std::string name = "XNNPACK value " + std::to_string(i);
    uint64_t type = g_.scalar(xvalue, 0, 1), v = g_.target(xvalue, 1);
    uint64_t tv = type == kTensorValue ? v : type == kQuantizedTensorValue && v ? g_.target(v, 0) : 0;
    if (!tv) g_.fail(name + " has no tensor");
    Tensor t;
    uint64_t dtype = g_.scalar(tv, kTensorDatatype, 2), dims = g_.target(tv, kTensorDims);
    if (dtype == 0 || dtype >= sizeof(kBits) / sizeof(kBits[0])) g_.fail(name + " has an unknown datatype");
    t.bits = kBits[dtype];
    t.rank = dims ? g_.length(dims) : 0;
    if (t.rank > kMaxDims) g_.fail(name + " has " + std::to_string(t.rank) + " dims (XNNPACK takes 6)");
    for (uint64_t k = 0; k < t.rank; ++k) t.dims[k] = g_.item(dims, k, 4);
    uint64_t bytes = t.bytes();
    if (bytes > kMaxTensorBytes)
      g_.fail(name + " has dims " + dims_text(t) + ", " + std::to_string(bytes >> 20) + " MiB (at most 16 GiB)");
    // XNNExecutor indexes the delegate call's arguments with every external input's and output's id, and the
    // tensors computed from an input are declared no larger than it (node()): so it must fit its argument.
    uint64_t flags = g_.scalar(tv, kTensorFlags, 4), external = g_.scalar(tv, kTensorExternal, 4);
    if ((flags & kExternalFlags) && (external >= externs_ || (calls_.called && external >= calls_.elements.size())))
      g_.fail(name + " is external value " + std::to_string(external) + " of a graph with " +
              std::to_string(externs_) + (calls_.called ? " called with " + std::to_string(calls_.elements.size()) +
              " arguments" : ""));
    if ((flags & kExternalFlags) && calls_.called && t.elements() > calls_.elements[external])
      g_.fail(name + " declares " + std::to_string(t.elements()) + " elements but its argument " +
              std::to_string(external) + " holds " + std::to_string(calls_.elements[external]));
    uint64_t constant = g_.scalar(tv, kTensorConstant, 4);
    t.constant = constant != 0, t.input = (flags & 1) != 0;  // XNN_VALUE_FLAG_EXTERNAL_INPUT
    tensors_.emplace(static_cast<uint32_t>(g_.scalar(tv, kTensorIdOut, 4)), t);  // first wins, as in XNNCompiler
    uint64_t holds = constant ? constant_bytes(constant, name) : 0;
    if (constant && holds < bytes)
      g_.fail(name + " needs " + std::to_string(bytes) + " bytes of constant data but its buffer holds " +
              std::to_string(holds));
    if (type == kQuantizedTensorValue) quantization(v, t, name);
    return constant ? 0 : bytes;
  }

  // The bytes XNNPACK may read at constant buffer `index` (XNNCompiler's getConstantDataPtr finds them).
  uint64_t constant_bytes(uint64_t index, const std::string& name) {
    const std::string entry = name + "'s constant buffer " + std::to_string(index);
    if (!has_header_) {  // the deprecated in-flatbuffer constant buffers
      uint64_t buffers = g_.target(root_, kGraphConstantBuffer);
      if (!buffers || index >= g_.length(buffers)) g_.fail(entry + " does not exist");
      uint64_t storage = g_.target(g_.element(buffers, index), 0);
      if (!storage) g_.fail(entry + " is empty");
      return g_.length(storage);
    }
    uint64_t offsets = g_.target(root_, kGraphConstantData);
    if (!offsets || index >= g_.length(offsets)) g_.fail(entry + " does not exist");
    uint64_t cd = g_.element(offsets, index);
    if (g_.field(cd, 2)) {  // named_key: XNNPACK gets the whole named segment (looked up by the key's c_str())
      std::string key = g_.bytes(g_.target(cd, 2));
      key = key.substr(0, key.find('\0'));
      auto it = program_.named.find(key);
      if (it == program_.named.end()) g_.fail(entry + " names data '" + key.substr(0, 80) + "' the program lacks");
      return program_.segment(it->second, "named data '" + key.substr(0, 80) + "'").second;
    }
    uint64_t offset = g_.scalar(cd, 0, 8), size = g_.scalar(cd, 1, 8);
    if (offset > constant_size_ || size > constant_size_ - offset)
      g_.fail(entry + " (" + std::to_string(size) + " bytes at " + std::to_string(offset) + ") lies outside its " +
              std::to_string(constant_size_) + " bytes of constant data");
    return size;
  }

  // Quantization parameters XNNCompiler reads without checking them.
  void quantization(uint64_t q, const Tensor& t, const std::string& name) {
    uint64_t type = g_.scalar(q, 1, 1), p = g_.target(q, 2);
    if (type < kPerChannel || type > kPerChannelGroup || !p) g_.fail(name + " has no quantization parameters");
    if (type == kPerTensor) return;
    if (type == kPerToken) {
      int64_t nonbatch = static_cast<int32_t>(g_.scalar(p, 0, 4));
      if (nonbatch < 0 || static_cast<uint64_t>(nonbatch) > t.rank) g_.fail(name + " has a bad per-token quantization");
      return;
    }
    uint64_t scale = g_.target(p, 0);  // per-channel: read (data) even when the scales live in a constant buffer
    int64_t channel_dim = static_cast<int32_t>(g_.scalar(p, 1, 4));
    if (channel_dim < 0 || static_cast<uint64_t>(channel_dim) >= t.rank)
      g_.fail(name + " has a quantization channel dim outside its dims " + dims_text(t));
    uint64_t scales, scale_index, scale_bytes;
    if (type == kPerChannel) {
      scales = t.dims[channel_dim], scale_index = g_.scalar(p, 2, 4), scale_bytes = 4;  // fp32
    } else {  // blockwise: XNNCompiler takes dims 0 and 1 as output and input channels, divides by group_size
      uint64_t group = g_.scalar(p, 2, 4);
      if (t.bits != 4 || t.rank != 2 || channel_dim != 0 || group == 0 || group > t.dims[1] || t.dims[1] % group != 0)
        g_.fail(name + " has a blockwise quantization that does not fit its dims " + dims_text(t));
      scales = t.dims[0] * (t.dims[1] / group), scale_index = g_.scalar(p, 4, 4), scale_bytes = 2;  // bf16
      if (scale_index && g_.scalar(p, 5, 4) != scales) g_.fail(name + " has the wrong number of block scales");
    }
    if (!scale && (type == kPerChannel || !scale_index)) g_.fail(name + " has no quantization scales");
    uint64_t holds = scale_index ? constant_bytes(scale_index, name + "'s scales") / scale_bytes : g_.length(scale);
    if (holds < scales)
      g_.fail(name + " needs " + std::to_string(scales) + " quantization scales but holds " + std::to_string(holds));
  }

  // A node reads values that exist before it (constants, external inputs, earlier nodes' outputs) and writes values
  // no one else writes: XNNPACK plans memory by that order and writes outputs in place, so a node retyped by one
  // byte (its table read with another type's field ids) that wrote into a constant, an external input or a value
  // another node computes crashed it.
  void node(uint64_t xnode, uint64_t j) {
    g_.visit();
    const std::string name = "XNNPACK node " + std::to_string(j);
    uint64_t type = g_.scalar(xnode, 0, 1), n = g_.target(xnode, 1);
    if (type == 0 || type >= kNodeTypes || !n) g_.fail(name + " has an unknown type or no parameters");
    const Layout& layout = kLayouts[type];
    const Tensor* in[5] = {};
    for (int k = 0; k < layout.n_in; ++k) {
      uint64_t id = g_.scalar(n, layout.in[k], 4);
      if (id == kInvalidId) continue;  // an optional input left out (XNNPACK refuses a required one)
      auto it = tensors_.find(static_cast<uint32_t>(id));
      if (it == tensors_.end()) g_.fail(name + " reads value id " + std::to_string(id) + ", which is not defined");
      if (!it->second.constant && !it->second.input && !it->second.computed)
        g_.fail(name + " reads value id " + std::to_string(id) + " before any node computes it");
      in[k] = &it->second;
    }
    Tensor* out[2] = {};
    for (int k = 0; k < layout.n_out; ++k) {
      uint64_t id = g_.scalar(n, layout.out[k], 4);
      auto it = tensors_.find(static_cast<uint32_t>(id));
      if (it == tensors_.end()) g_.fail(name + " writes value id " + std::to_string(id) + ", which is not defined");
      if (it->second.constant || it->second.input || it->second.computed)
        g_.fail(name + " writes value id " + std::to_string(id) + ", a constant, input or other node's output");
      it->second.computed = true, out[k] = &it->second;
    }
    // XNNPACK plans its workspace from the declared dims of the values nodes compute: they may not exceed what the
    // node's inputs make (so no declared size grows past the delegate's arguments and constants).
    uint64_t bound = UINT64_MAX;
    if (layout.shape >= kConv)
      window(n, layout.shape, in[1], in[2], name);
    else if (layout.shape != kPlain && in[0])
      bound = shape(n, layout.shape, *in[0], name);
    else if (layout.shape == kPlain)
      bound = made_by(type, in, layout.n_in);
    for (int k = 0; k < layout.n_out; ++k)
      if (out[k]->elements() > bound)
        g_.fail(name + " declares an output of " + std::to_string(out[k]->elements()) + " elements, more than the " +
                std::to_string(bound) + " its inputs make");
  }

  // The most elements a node of an elementwise, matrix or concatenating type computes from these inputs.
  static uint64_t made_by(uint64_t type, const Tensor* const* in, int n_in) {
    if (type == kFullyConnected) {  // input rows x the filter's output channels (either dim: transposed weights)
      if (!in[0] || !in[1]) return UINT64_MAX;  // XNNPACK refuses it
      const Tensor &x = *in[0], &w = *in[1];
      uint64_t rows = x.rank && x.dims[x.rank - 1] ? x.elements() / x.dims[x.rank - 1] : x.elements();
      return mul(rows, *std::max_element(w.dims, w.dims + std::max<uint64_t>(w.rank, 1)));
    }
    uint64_t bound = 1, sum = 0;
    for (int p = 0; p < static_cast<int>(kMaxDims); ++p) {  // broadcasting: the largest dim at each position
      uint64_t largest = 1;
      for (int k = 0; k < n_in; ++k)
        if (in[k] && in[k]->rank > static_cast<uint64_t>(p))
          largest = std::max(largest, in[k]->dims[in[k]->rank - 1 - p]);
      bound = mul(bound, largest);
    }
    for (int k = 0; k < n_in; ++k) sum += in[k] ? in[k]->elements() : 0;
    bool concatenate = type == kConcatenate2 || type == kConcatenate3 || type == kConcatenate4 || type == kConcatenate5;
    return concatenate ? sum : bound;
  }

  // Convolution and pooling parameters: non-zero kernels, strides, dilations and channels within bounds, and a
  // filter (and bias) holding every element the parameters make XNNPACK pack.
  void window(uint64_t n, Shape kind, const Tensor* filter, const Tensor* bias, const std::string& name) {
    // _XNNNodeConv: paddings 0-3, kernel 4-5, subsampling 6-7, dilation 8-9, group input/output channels 10-11,
    // groups 12, adjustments 13-14. _XNNPooling2D: paddings 0-3, pooling 4-5, stride 6-7, dilation 8-9.
    // XNNArgMaxPooling2d: paddings 0-3, pooling 4-5.
    const bool conv = kind == kConv || kind == kDepthwise;
    const int fields = conv ? 15 : kind == kPool ? 10 : 6, nonzero_end = conv ? 13 : 6;
    uint64_t f[15] = {};
    for (int k = 0; k < fields; ++k) f[k] = g_.scalar(n, k, 4);
    for (int k = 0; k < fields; ++k)
      if (f[k] > kMaxWindow || (k >= 4 && k < nonzero_end && f[k] == 0))
        g_.fail(name + " has a kernel, stride, dilation or channel count of 0 or over " + std::to_string(kMaxWindow));
    if (!conv) return;
    // elements XNNPACK reads from the filter and bias (depthwise: input channels = groups, multiplier = out / in)
    uint64_t out = kind == kDepthwise ? f[12] * (f[11] / f[10]) : f[12] * f[11];
    uint64_t need = mul(mul(out, f[4] * f[5]), kind == kDepthwise ? 1 : f[10]);
    if (!filter || !filter->constant || filter->bytes_of(&need, 1) > filter->bytes())
      g_.fail(name + " needs a constant filter of " + std::to_string(need) + " elements");
    if (bias && (!bias->constant || bias->bytes_of(&out, 1) > bias->bytes()))
      g_.fail(name + " needs a constant bias of " + std::to_string(out) + " elements");
  }

  // Shapes XNNPACK derives from the node's own fields: they must cover the input's rank and stay within bounds.
  uint64_t shape(uint64_t n, Shape kind, const Tensor& input, const std::string& name) {
    Tensor out = input;
    if (kind == kResize) {
      if (input.rank == 4) out.dims[1] = g_.scalar(n, 0, 4), out.dims[2] = g_.scalar(n, 1, 4);
    } else {
      // transpose: perm (1); pad: pre (0) and post (1) paddings; reshape: new shape (1); slice: offsets, sizes (1, 2)
      int first = kind == kPad ? 0 : 1, count = kind == kPad || kind == kSlice ? 2 : 1;
      uint64_t v[2] = {0, 0};
      for (int k = 0; k < count; ++k) {
        v[k] = g_.target(n, first + k);
        if (!v[k] || g_.length(v[k]) > kMaxDims || (kind != kReshape && g_.length(v[k]) < input.rank))
          g_.fail(name + " has shape parameters that do not fit its input's " + std::to_string(input.rank) + " dims");
      }
      if (kind == kTranspose) {
        uint64_t seen = 0;
        for (uint64_t k = 0; k < g_.length(v[0]); ++k)
          seen |= uint64_t{1} << std::min<uint64_t>(g_.item(v[0], k, 4), 63);
        if (g_.length(v[0]) != input.rank || seen != (uint64_t{1} << input.rank) - 1)
          g_.fail(name + " has a permutation that does not fit its input's " + std::to_string(input.rank) + " dims");
      } else if (kind == kPad) {
        for (uint64_t k = 0; k < input.rank; ++k)
          out.dims[k] = input.dims[k] + g_.item(v[0], k, 4) + g_.item(v[1], k, 4);
      } else if (kind == kReshape) {
        out.rank = g_.length(v[0]);
        for (uint64_t k = 0; k < out.rank; ++k) out.dims[k] = std::max<uint64_t>(g_.item(v[0], k, 4), 1);
      } else if (g_.length(v[0]) != g_.length(v[1])) {  // slice
        g_.fail(name + " has a slice whose offsets and sizes differ in length");
      }
    }
    if (out.bytes() > kMaxTensorBytes) g_.fail(name + " makes a tensor of " + dims_text(out) + ", over 16 GiB");
    // a reshape, transpose or slice keeps at most its input's elements (a reshape's 0 dims are inferred)
    return kind == kPad || kind == kResize ? out.elements() : input.elements();
  }

  Flat g_;
  bool has_header_;
  uint64_t constant_size_;
  const Program& program_;
  const Calls& calls_;
  uint64_t root_ = 0, externs_ = 0;
  std::unordered_map<uint32_t, Tensor> tensors_;  // by id_out, the ids nodes name
};

uint64_t le(const std::vector<uint8_t>& b, size_t at, int n) {
  uint64_t v = 0;
  for (int k = n - 1; k >= 0; --k) v = (v << 8) | b[at + k];
  return v;
}

// One delegate's payload: the header (XNNHeader::Parse's checks), then its graph.
void check_payload(const Program& program, uint64_t start, uint64_t size, bool in_file, const std::string& where,
                   const Calls& calls) {
  auto bytes = [&](uint64_t at, uint64_t n) {
    return in_file ? program.file.read(start + at, n) : program.fb.slice(start + at, n);
  };
  if (size < kHeaderSize) program.fb.fail(where + "its XNNPACK payload is " + std::to_string(size) + " bytes");
  std::vector<uint8_t> head = bytes(0, kHeaderSize);
  if (std::memcmp(head.data() + 4, "XH00", 4) != 0) {  // no header: the whole payload is the flatbuffer
    Graph(Flat(bytes(0, size), program.fb.path(), where), false, 0, program, calls).check();
    return;
  }
  uint64_t fb_offset = le(head, 10, 4), fb_size = le(head, 14, 4), cd_offset = le(head, 18, 4);
  uint64_t cd_size = le(head, 22, 8);
  if (fb_size < 8 || fb_offset > size || fb_size > size - fb_offset || cd_offset > size || cd_size > size - cd_offset ||
      cd_offset < fb_offset + fb_size)
    program.fb.fail(where + "its XNNPACK header's offsets do not fit its " + std::to_string(size) + "-byte payload");
  Graph(Flat(bytes(fb_offset, fb_size), program.fb.path(), where), true, cd_size, program, calls).check();
}

// The elements of the tensor a delegate call passes as value `index` of its method (0 when it is not a tensor).
uint64_t argument_elements(const Flat& fb, uint64_t values, uint64_t index) {
  int64_t i = static_cast<int32_t>(index);
  if (!values || i < 0 || static_cast<uint64_t>(i) >= fb.length(values)) return 0;  // Method::init refuses it
  uint64_t evalue = fb.element(values, i), tensor = fb.target(evalue, kEValue);
  if (fb.scalar(evalue, kEValueType, 1) != kEValueTensor || !tensor) return 0;
  uint64_t sizes = fb.target(tensor, kTensorSizes), elements = 1;
  for (uint64_t k = 0; sizes && k < fb.length(sizes); ++k) {
    int64_t size = static_cast<int32_t>(fb.item(sizes, k, 4));
    elements = mul(elements, size < 0 ? 0 : static_cast<uint64_t>(size));
  }
  return elements;
}

}  // namespace

void check_xnnpack_delegates(Flat& fb, const std::string& path) {
  File file(path);
  Program program{fb, file, {}};
  const uint64_t root = fb.root();
  if (uint64_t named = fb.target(root, kProgramNamedData))
    for (uint64_t i = 0; i < fb.length(named); ++i) {
      uint64_t entry = fb.element(named, i), key = fb.target(entry, 0);
      if (key) program.named.emplace(fb.bytes(key), static_cast<uint32_t>(fb.scalar(entry, 1, 4)));
    }
  uint64_t plans = fb.target(root, kProgramPlans);
  for (uint64_t p = 0; plans && p < fb.length(plans); ++p) {
    uint64_t plan = fb.element(plans, p), delegates = fb.target(plan, kPlanDelegates);
    if (!delegates) continue;
    const std::string method = fb.string(plan, kPlanName);
    std::vector<Calls> calls(fb.length(delegates));
    uint64_t chains = fb.target(plan, kPlanChains), plan_values = fb.target(plan, kPlanValues);
    for (uint64_t c = 0; chains && c < fb.length(chains); ++c) {
      uint64_t instructions = fb.target(fb.element(chains, c), kChainInstructions);
      for (uint64_t i = 0; instructions && i < fb.length(instructions); ++i) {
        fb.visit();
        uint64_t instruction = fb.element(instructions, i), call = fb.target(instruction, kInstruction);
        if (fb.scalar(instruction, kInstructionType, 1) != kDelegateCall || !call) continue;
        int64_t d = static_cast<int32_t>(fb.scalar(call, kCallDelegate, 4));
        if (d < 0 || static_cast<uint64_t>(d) >= calls.size()) continue;  // Method::init refuses it
        uint64_t list = fb.target(call, kCallArgs), n = list ? fb.length(list) : 0;
        std::vector<uint64_t> elements(n, 0);
        for (uint64_t a = 0; a < n; ++a) elements[a] = argument_elements(fb, plan_values, fb.item(list, a, 4));
        Calls& into = calls[d];
        if (into.called && into.elements.size() < n) elements.resize(into.elements.size());
        for (uint64_t a = 0; into.called && a < elements.size(); ++a)
          elements[a] = std::min(elements[a], into.elements[a]);
        into.called = true, into.elements = std::move(elements);
      }
    }
    for (uint64_t d = 0; d < calls.size(); ++d) {
      uint64_t delegate = fb.element(delegates, d);
      if (fb.string(delegate, kDelegateId) != "XnnpackBackend") continue;
      const std::string where = "method " + method + " delegate " + std::to_string(d) + ": ";
      uint64_t ref = fb.target(delegate, kDelegateProcessed);
      if (!ref) fb.fail(where + "it has no data");
      uint64_t index = fb.scalar(ref, kReferenceIndex, 4);
      if (fb.scalar(ref, kReferenceLocation, 1) == kSegment) {
        auto [start, size] = program.segment(index, where + "its XNNPACK payload");
        check_payload(program, start, size, true, where, calls[d]);
      } else {
        uint64_t inline_data = fb.target(root, kProgramDelegateData);
        if (!inline_data || index >= fb.length(inline_data)) fb.fail(where + "its inline data does not exist");
        uint64_t data = fb.target(fb.element(inline_data, index), 0);
        if (!data) fb.fail(where + "its inline data is empty");
        check_payload(program, data + 4, fb.length(data), false, where, calls[d]);
      }
    }
  }
}

}  // namespace cosmoes
