// XLA FFI handlers: decode buffers and attributes, validate, pick the kernel for
// the configuration, launch on XLA's stream. Nothing here allocates, synchronizes
// or touches device memory itself; workspaces arrive as extra results.
//
// Arrays are [..., seq, heads, head_dim] and lse-like arrays [..., heads, seq_q]:
// every leading dim folds into the batch, which is the vmap rule.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "../kernel_registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flash {
namespace {

std::string dims_str(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_flash: " + msg);
}

// [..., seq, heads, head_dim] -> (batch, seq, heads, head_dim).
struct Layout4 {
  int64_t batch, seq, heads, dim;
};

bool decode(const ffi::AnyBuffer& b, Layout4* out) {
  auto d = b.dimensions();
  if (d.size() < 3) return false;
  const size_t r = d.size();
  out->batch = 1;
  for (size_t i = 0; i + 3 < r; ++i) out->batch *= d[i];
  out->seq = d[r - 3];
  out->heads = d[r - 2];
  out->dim = d[r - 1];
  return true;
}

bool same_dims(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
  auto x = a.dimensions(), y = b.dimensions();
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i)
    if (x[i] != y[i]) return false;
  return true;
}

// lse-like arrays: [..., heads, seq_q] with the leading dims of q.
bool is_row_stat_of(ffi::Span<const int64_t> stat, const ffi::AnyBuffer& q) {
  auto d = q.dimensions();
  if (stat.size() != d.size() - 1) return false;
  for (size_t i = 0; i + 3 < d.size(); ++i)
    if (stat[i] != d[i]) return false;
  return stat[stat.size() - 2] == d[d.size() - 2] && stat[stat.size() - 1] == d[d.size() - 3];
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT32_MAX; }

// Shared checks of q, k, v; fills the shape and dtype.
ffi::Error check_qkv(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                     AttentionShape* shape, DType* dtype) {
  const auto t = q.element_type();
  if (t != ffi::DataType::F16 && t != ffi::DataType::BF16)
    return invalid("query must be float16 or bfloat16");
  if (k.element_type() != t || v.element_type() != t)
    return invalid("query, key and value must share one dtype");
  Layout4 lq, lk;
  if (!decode(q, &lq) || !decode(k, &lk))
    return invalid("query and key need rank >= 3 ([..., seq, heads, head_dim]), got " +
                   dims_str(q.dimensions()) + " and " + dims_str(k.dimensions()));
  if (!same_dims(k, v))
    return invalid("key and value shapes differ: " + dims_str(k.dimensions()) + " vs " +
                   dims_str(v.dimensions()));
  if (k.dimensions().size() != q.dimensions().size() || lq.batch != lk.batch || lq.dim != lk.dim)
    return invalid("query " + dims_str(q.dimensions()) + " and key " + dims_str(k.dimensions()) +
                   " must agree on batch and head_dim");
  if (lk.heads <= 0 || lq.heads % lk.heads != 0)
    return invalid("num_heads " + std::to_string(lq.heads) + " must be a multiple of num_kv_heads " +
                   std::to_string(lk.heads));
  if (lq.seq < 1 || lk.seq < 1) return invalid("sequence lengths must be >= 1");
  if (!fits_int(lq.batch) || !fits_int(lq.seq) || !fits_int(lk.seq) || lq.batch > 65535 ||
      lq.heads > 65535)
    return invalid("shape too large: query " + dims_str(q.dimensions()));
  // A causal grid puts the tiles of a sequence (64 rows at least) on an axis of at most 65535.
  constexpr int64_t kMaxSeq = int64_t(65535) * 64;
  if (lq.seq > kMaxSeq || lk.seq > kMaxSeq)
    return invalid("sequence lengths above " + std::to_string(kMaxSeq) + " are not supported");
  *dtype = t == ffi::DataType::BF16 ? DType::kBF16 : DType::kF16;
  *shape = AttentionShape{int(lq.batch), int(lq.seq), int(lk.seq),
                          int(lq.heads), int(lk.heads), int(lq.dim)};
  return ffi::Error::Success();
}

ffi::Error not_compiled(const AttentionShape& s) {
  return invalid("no kernel compiled for head_dim " + std::to_string(s.head_dim) +
                 " and this dtype in this build (see JAX_FLASH_HEAD_DIMS / JAX_FLASH_DTYPES)");
}

// The launcher of the best kernel family for this device that has the
// configuration. The sm90 forward takes every variant but dropout, the sm90
// backward block-sparse masks (not with a deterministic dQ); the rest runs on
// the sm80 family only.
template <typename Launcher, typename Find>
Launcher pick(Find find, DType dtype, int head_dim, bool sm80_only) {
  Arch archs[kNumArchs];
  const int n = preferred_archs(archs);
  for (int i = 0; i < n; ++i) {
    if (sm80_only && archs[i] != Arch::kSm80) continue;
    if (Launcher launch = find(archs[i], dtype, head_dim)) return launch;
  }
  return nullptr;
}

ffi::Error check_variant(int32_t left, int32_t right, bool causal, float softcap) {
  if (left < -1 || right < -1)
    return invalid("window sides must be >= 0, or -1 for unbounded");
  if (causal && right > 0) return invalid("a causal window's right side must be 0 or -1");
  if (!(softcap >= 0.f)) return invalid("softcap must be >= 0 (0: none)");
  return ffi::Error::Success();
}

// The arrays of the variants, each empty when the call does not use it.
struct VariantBuffers {
  ffi::Buffer<ffi::S32> q_segment_ids, kv_segment_ids, q_segment_ranges, kv_segment_ranges;
  ffi::Buffer<ffi::F32> alibi_slopes;
  ffi::Buffer<ffi::U32> dropout_seed;
  ffi::Buffer<ffi::S32> block_q_lists, block_q_counts, block_k_lists, block_k_counts;
};

struct Variants {
  SegmentIds segments{};
  const float* alibi_slopes = nullptr;
  DropoutParams dropout{};
  BlockSparseParams block_sparse{};
};

// Checks the variants' arrays against the shape (every leading dim of theirs
// folds into the batch, as for q) and points the kernel parameters at them.
// The lists of a block-sparse mask: [..., heads', rows, cols] with the
// leading dims folding into batch' rows and heads' 1 or the query heads;
// counts [..., heads', rows]. Each list row serves a run of batch / batch'
// consecutive batch rows: a mask shared by the batch comes with batch' 1, and
// under vmap (whose dims lead and fold into both) with one row per vmapped
// entry.
ffi::Error check_block_lists(const AttentionShape& sh, const ffi::Buffer<ffi::S32>& lists,
                             const ffi::Buffer<ffi::S32>& counts, int64_t rows, int64_t cols,
                             int64_t* heads, int64_t* batch_run) {
  auto d = lists.dimensions();
  auto c = counts.dimensions();
  const std::string got = dims_str(d) + " and " + dims_str(c);
  if (d.size() < 3 || c.size() != d.size() - 1)
    return invalid("block mask lists must be [batch, heads, rows, cols] with counts "
                   "[batch, heads, rows], got " + got);
  int64_t lead = 1;
  for (size_t i = 0; i + 3 < d.size(); ++i) lead *= d[i];
  const int64_t h = d[d.size() - 3];
  if (lead < 1 || sh.batch % lead != 0 || (h != 1 && h != sh.heads) ||
      d[d.size() - 2] != rows || d[d.size() - 1] != cols ||
      counts.element_count() != lead * h * rows)
    return invalid("block mask lists must be [batch', 1 or heads, " + std::to_string(rows) +
                   ", " + std::to_string(cols) + "] with counts [batch', 1 or heads, " +
                   std::to_string(rows) + "] and batch' dividing the batch " +
                   std::to_string(sh.batch) + ", got " + got);
  *heads = h;
  *batch_run = sh.batch / lead;
  return ffi::Error::Success();
}

ffi::Error decode_variants(const AttentionShape& sh, const VariantBuffers& b,
                           uint32_t dropout_threshold, float dropout_scale, int32_t block_q,
                           int32_t block_k, Variants* v) {
  const int64_t batch = sh.batch;
  auto granules = [](int64_t seq) { return (seq + kSegmentGranule - 1) / kSegmentGranule; };
  const int64_t seg_counts[4] = {b.q_segment_ids.element_count(),
                                 b.kv_segment_ids.element_count(),
                                 b.q_segment_ranges.element_count(),
                                 b.kv_segment_ranges.element_count()};
  const int64_t seg_expected[4] = {batch * sh.seq_q, batch * sh.seq_k,
                                   batch * granules(sh.seq_q) * 4,
                                   batch * granules(sh.seq_k) * 4};
  if (seg_counts[0] != 0 || seg_counts[1] != 0 || seg_counts[2] != 0 || seg_counts[3] != 0) {
    for (int i = 0; i < 4; ++i)
      if (seg_counts[i] != seg_expected[i])
        return invalid("segment ids must be [batch, seq_q] and [batch, seq_k] with range "
                       "tables [batch, ceil(seq / " + std::to_string(kSegmentGranule) +
                       "), 4], got " + dims_str(b.q_segment_ids.dimensions()) + ", " +
                       dims_str(b.kv_segment_ids.dimensions()) + ", " +
                       dims_str(b.q_segment_ranges.dimensions()) + ", " +
                       dims_str(b.kv_segment_ranges.dimensions()));
    v->segments = {b.q_segment_ids.typed_data(), b.kv_segment_ids.typed_data(),
                   b.q_segment_ranges.typed_data(), b.kv_segment_ranges.typed_data()};
  }
  if (const int64_t n = b.alibi_slopes.element_count(); n != 0) {
    if (n != batch * sh.heads)
      return invalid("alibi_slopes must be [batch, heads], got " +
                     dims_str(b.alibi_slopes.dimensions()));
    v->alibi_slopes = b.alibi_slopes.typed_data();
  }
  if (const int64_t n = b.dropout_seed.element_count(); n != 0) {
    if (n != 2)
      return invalid("dropout_seed must hold 2 words, got " +
                     dims_str(b.dropout_seed.dimensions()));
    if (!(dropout_scale >= 1.f) || !std::isfinite(dropout_scale))
      return invalid("dropout_scale must be 1 / (1 - rate) for a rate in [0, 1)");
    v->dropout = {b.dropout_seed.typed_data(), dropout_threshold, dropout_scale};
  }
  if (block_q != 0 || block_k != 0) {
    if (block_q <= 0 || block_k <= 0 || block_q % kBlockSparseGranule != 0 ||
        block_k % kBlockSparseGranule != 0)
      return invalid("block mask block sizes must be positive multiples of " +
                     std::to_string(kBlockSparseGranule) + ", got " + std::to_string(block_q) +
                     " x " + std::to_string(block_k));
    const int64_t nq = (int64_t(sh.seq_q) + block_q - 1) / block_q;
    const int64_t nk = (int64_t(sh.seq_k) + block_k - 1) / block_k;
    int64_t q_heads = 0, k_heads = 0, q_run = 0, k_run = 0;
    if (auto err = check_block_lists(sh, b.block_q_lists, b.block_q_counts, nq, nk, &q_heads,
                                     &q_run);
        err.failure())
      return err;
    if (auto err = check_block_lists(sh, b.block_k_lists, b.block_k_counts, nk, nq, &k_heads,
                                     &k_run);
        err.failure())
      return err;
    if (q_heads != k_heads || q_run != k_run)
      return invalid("the block mask's two lists differ in batch or heads");
    v->block_sparse = {b.block_q_lists.typed_data(), b.block_q_counts.typed_data(),
                       b.block_k_lists.typed_data(), b.block_k_counts.typed_data(),
                       block_q, block_k, int(q_heads), int(q_run)};
  }
  return ffi::Error::Success();
}

// Whether a forward or backward call asks for what only the sm80 kernels run.
// The sm90 backward takes a block-sparse mask, but not with a deterministic dQ.
bool sm80_only_fwd(const Variants& v) { return v.dropout.seed != nullptr; }
bool sm80_only_bwd(int32_t left, int32_t right, bool causal, float softcap, bool deterministic,
                   const Variants& v) {
  return left >= 0 || (!causal && right >= 0) || softcap > 0.f || v.segments.q_ids != nullptr ||
         v.alibi_slopes != nullptr || v.dropout.seed != nullptr ||
         (v.block_sparse.q_lists != nullptr && deterministic);
}

ffi::Error launched(cudaError_t err) {
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_flash: kernel launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::S32> q_segment_ids, ffi::Buffer<ffi::S32> kv_segment_ids,
                   ffi::Buffer<ffi::S32> q_segment_ranges,
                   ffi::Buffer<ffi::S32> kv_segment_ranges, ffi::Buffer<ffi::F32> alibi_slopes,
                   ffi::Buffer<ffi::U32> dropout_seed, ffi::Buffer<ffi::S32> block_q_lists,
                   ffi::Buffer<ffi::S32> block_q_counts, ffi::Buffer<ffi::S32> block_k_lists,
                   ffi::Buffer<ffi::S32> block_k_counts, float softmax_scale, bool causal,
                   int32_t window_left, int32_t window_right, float softcap,
                   uint32_t dropout_threshold, float dropout_scale, int32_t block_q,
                   int32_t block_k,
                   ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse,
                   ffi::Result<ffi::Buffer<ffi::S32>> tile_counter) {
  AttentionShape shape;
  DType dtype;
  if (auto err = check_qkv(q, k, v, &shape, &dtype); err.failure()) return err;
  if (!same_dims(q, *out) || out->element_type() != q.element_type())
    return invalid("out must match query " + dims_str(q.dimensions()));
  if (!is_row_stat_of(lse->dimensions(), q))
    return invalid("lse must be [..., heads, seq_q], got " + dims_str(lse->dimensions()));
  // (vmap gives every workspace a batch dimension; the first element serves.)
  if (tile_counter->element_count() < 1)
    return invalid("tile_counter must have an element, got " +
                   dims_str(tile_counter->dimensions()));
  if (auto err = check_variant(window_left, window_right, causal, softcap); err.failure())
    return err;
  Variants var;
  if (auto err = decode_variants(shape,
                                 {q_segment_ids, kv_segment_ids, q_segment_ranges,
                                  kv_segment_ranges, alibi_slopes, dropout_seed,
                                  block_q_lists, block_q_counts, block_k_lists,
                                  block_k_counts},
                                 dropout_threshold, dropout_scale, block_q, block_k, &var);
      err.failure())
    return err;
  const FwdLauncher launch =
      pick<FwdLauncher>(find_fwd, dtype, shape.head_dim, sm80_only_fwd(var));
  if (!launch) return not_compiled(shape);
  FwdParams p{shape, q.untyped_data(), k.untyped_data(), v.untyped_data(),
              out->untyped_data(), lse->typed_data(), tile_counter->typed_data(),
              softmax_scale, causal, window_left, window_right, softcap,
              var.segments, var.alibi_slopes, var.dropout, var.block_sparse};
  return launched(launch(p, stream));
}

ffi::Error BwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer out, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dlse, ffi::Buffer<ffi::S32> q_segment_ids,
                   ffi::Buffer<ffi::S32> kv_segment_ids, ffi::Buffer<ffi::S32> q_segment_ranges,
                   ffi::Buffer<ffi::S32> kv_segment_ranges, ffi::Buffer<ffi::F32> alibi_slopes,
                   ffi::Buffer<ffi::U32> dropout_seed, ffi::Buffer<ffi::S32> block_q_lists,
                   ffi::Buffer<ffi::S32> block_q_counts, ffi::Buffer<ffi::S32> block_k_lists,
                   ffi::Buffer<ffi::S32> block_k_counts, float softmax_scale, bool causal,
                   int32_t window_left, int32_t window_right, float softcap,
                   uint32_t dropout_threshold, float dropout_scale, int32_t block_q,
                   int32_t block_k,
                   bool deterministic, ffi::Result<ffi::AnyBuffer> dq,
                   ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                   ffi::Result<ffi::Buffer<ffi::F32>> dq_accum,
                   ffi::Result<ffi::Buffer<ffi::F32>> delta,
                   ffi::Result<ffi::Buffer<ffi::S32>> dq_turns,
                   ffi::Result<ffi::Buffer<ffi::F32>> dalibi_slopes,
                   ffi::Result<ffi::Buffer<ffi::F32>> dkv_partials) {
  AttentionShape shape;
  DType dtype;
  if (auto err = check_qkv(q, k, v, &shape, &dtype); err.failure()) return err;
  for (const ffi::AnyBuffer* b : {&out, &dout, &*dq})
    if (!same_dims(q, *b) || b->element_type() != q.element_type())
      return invalid("out, dout and dq must match query " + dims_str(q.dimensions()));
  for (const ffi::AnyBuffer* b : {&*dk, &*dv})
    if (!same_dims(k, *b) || b->element_type() != k.element_type())
      return invalid("dk and dv must match key " + dims_str(k.dimensions()));
  if (dq_accum->element_count() != q.element_count())
    return invalid("dq_accum must have the element count of query");
  for (auto d : {lse.dimensions(), dlse.dimensions(), delta->dimensions()})
    if (!is_row_stat_of(d, q))
      return invalid("lse, dlse and delta must be [..., heads, seq_q], got " + dims_str(d));
  const int64_t turn_blocks = (int64_t(shape.seq_q) + kDQTurnRows - 1) / kDQTurnRows;
  if (dq_turns->element_count() !=
      int64_t(shape.batch) * shape.heads * turn_blocks)
    return invalid("dq_turns must be [..., heads, ceil(seq_q / " + std::to_string(kDQTurnRows) +
                   ")], got " + dims_str(dq_turns->dimensions()));
  if (auto err = check_variant(window_left, window_right, causal, softcap); err.failure())
    return err;
  Variants var;
  if (auto err = decode_variants(shape,
                                 {q_segment_ids, kv_segment_ids, q_segment_ranges,
                                  kv_segment_ranges, alibi_slopes, dropout_seed,
                                  block_q_lists, block_q_counts, block_k_lists,
                                  block_k_counts},
                                 dropout_threshold, dropout_scale, block_q, block_k, &var);
      err.failure())
    return err;
  if (dalibi_slopes->element_count() != alibi_slopes.element_count())
    return invalid("dalibi_slopes must match alibi_slopes " +
                   dims_str(alibi_slopes.dimensions()));
  const BwdLauncher launch =
      pick<BwdLauncher>(find_bwd, dtype, shape.head_dim,
                        sm80_only_bwd(window_left, window_right, causal, softcap, deterministic,
                                      var));
  if (!launch) return not_compiled(shape);
  BwdParams p{shape,
              q.untyped_data(),
              k.untyped_data(),
              v.untyped_data(),
              out.untyped_data(),
              dout.untyped_data(),
              lse.typed_data(),
              dlse.typed_data(),
              dq->untyped_data(),
              dk->untyped_data(),
              dv->untyped_data(),
              dq_accum->typed_data(),
              delta->typed_data(),
              deterministic ? dq_turns->typed_data() : nullptr,
              deterministic ? nullptr : dq_turns->typed_data(),
              dkv_partials->typed_data(),
              int64_t(dkv_partials->element_count()),
              softmax_scale,
              causal,
              window_left,
              window_right,
              softcap,
              var.segments,
              var.alibi_slopes,
              var.alibi_slopes != nullptr ? dalibi_slopes->typed_data() : nullptr,
              var.dropout,
              var.block_sparse};
  return launched(launch(p, stream));
}

}  // namespace
}  // namespace jax_flash

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashFwd, jax_flash::FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_segment_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_segment_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_segment_ranges
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_segment_ranges
                                  .Arg<ffi::Buffer<ffi::F32>>()   // alibi_slopes
                                  .Arg<ffi::Buffer<ffi::U32>>()   // dropout_seed
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_q_lists
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_q_counts
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_k_lists
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_k_counts
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<int32_t>("window_left")
                                  .Attr<int32_t>("window_right")
                                  .Attr<float>("softcap")
                                  .Attr<uint32_t>("dropout_threshold")
                                  .Attr<float>("dropout_scale")
                                  .Attr<int32_t>("block_q")
                                  .Attr<int32_t>("block_k")
                                  .Ret<ffi::AnyBuffer>()            // out
                                  .Ret<ffi::Buffer<ffi::F32>>()     // lse
                                  .Ret<ffi::Buffer<ffi::S32>>(),    // tile_counter workspace
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashBwd, jax_flash::BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k
                                  .Arg<ffi::AnyBuffer>()          // v
                                  .Arg<ffi::AnyBuffer>()          // out
                                  .Arg<ffi::AnyBuffer>()          // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dlse
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_segment_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_segment_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_segment_ranges
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_segment_ranges
                                  .Arg<ffi::Buffer<ffi::F32>>()   // alibi_slopes
                                  .Arg<ffi::Buffer<ffi::U32>>()   // dropout_seed
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_q_lists
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_q_counts
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_k_lists
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_k_counts
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<int32_t>("window_left")
                                  .Attr<int32_t>("window_right")
                                  .Attr<float>("softcap")
                                  .Attr<uint32_t>("dropout_threshold")
                                  .Attr<float>("dropout_scale")
                                  .Attr<int32_t>("block_q")
                                  .Attr<int32_t>("block_k")
                                  .Attr<bool>("deterministic")
                                  .Ret<ffi::AnyBuffer>()          // dq
                                  .Ret<ffi::AnyBuffer>()          // dk
                                  .Ret<ffi::AnyBuffer>()          // dv
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_accum workspace
                                  .Ret<ffi::Buffer<ffi::F32>>()   // delta workspace
                                  .Ret<ffi::Buffer<ffi::S32>>()   // dq_turns workspace
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dalibi_slopes
                                  .Ret<ffi::Buffer<ffi::F32>>(),  // dkv_partials workspace
                              {ffi::Traits::kCmdBufferCompatible});
