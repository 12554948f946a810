// Packed documents: query i sees key j only when their segment ids are equal.
// Whole blocks are skipped when their id ranges do not overlap (no id of one
// can equal an id of the other), and a block pair whose queries and keys all
// carry the same one id needs no per-element test.
//
// The range tables also hold, per granule, the largest id up to it and the
// smallest from it on. Both only grow along the sequence, so two binary
// searches bound the keys a query block can meet (and the queries a key
// block can): with sorted ids, as packed documents have, a block visits its
// own documents' blocks only, and the cost stays linear in the length.
#pragma once

#include <climits>
#include <cstdint>

#include "../params.h"

namespace jax_flash {

struct SegmentMask {
  const int* q_ids;   // this batch row's; nullptr: no segments
  const int* kv_ids;
  const int4* q_ranges;   // per granule: min, max, max up to it, min from it on
  const int4* kv_ranges;
  int seq_q;
  int seq_k;

  template <typename Params>
  __device__ static SegmentMask of(const Params& p, int batch) {
    const SegmentIds& s = p.segments;
    if (s.q_ids == nullptr) return {nullptr, nullptr, nullptr, nullptr, 0, 0};
    const int seq_q = p.shape.seq_q, seq_k = p.shape.seq_k;
    const int q_granules = (seq_q + kSegmentGranule - 1) / kSegmentGranule;
    const int kv_granules = (seq_k + kSegmentGranule - 1) / kSegmentGranule;
    return {s.q_ids + int64_t(batch) * seq_q, s.kv_ids + int64_t(batch) * seq_k,
            reinterpret_cast<const int4*>(s.q_ranges) + int64_t(batch) * q_granules,
            reinterpret_cast<const int4*>(s.kv_ranges) + int64_t(batch) * kv_granules,
            seq_q, seq_k};
  }

  __device__ __forceinline__ bool on() const { return q_ids != nullptr; }

  // (smallest, largest) id of positions [begin, begin + count) of a sequence
  // of `length`, from its range table.
  static __device__ __forceinline__ int2 span(const int4* ranges, int length, int begin,
                                              int count) {
    const int end = min(begin + count, length);
    int2 r = make_int2(INT_MAX, INT_MIN);
    for (int g = begin / kSegmentGranule; g * kSegmentGranule < end; ++g) {
      const int4 x = __ldg(ranges + g);
      r.x = min(r.x, x.x);
      r.y = max(r.y, x.y);
    }
    return r;
  }

  // [begin, end) positions of a sequence of `length` outside of which no id
  // lies in ids = [lo, hi]: before `begin` every id is below lo, from `end` on
  // every id above hi.
  static __device__ __forceinline__ int2 reach(const int4* ranges, int length, int2 ids) {
    const int granules = (length + kSegmentGranule - 1) / kSegmentGranule;
    int a = 0, b = granules;  // the first granule whose max so far is >= lo
    while (a < b) {
      const int g = (a + b) / 2;
      if (__ldg(&ranges[g].z) >= ids.x) b = g; else a = g + 1;
    }
    const int first = a;
    b = granules;  // the first granule whose min from there on is > hi
    while (a < b) {
      const int g = (a + b) / 2;
      if (__ldg(&ranges[g].w) > ids.y) b = g; else a = g + 1;
    }
    return make_int2(first * kSegmentGranule, min(length, a * kSegmentGranule));
  }

  // [begin, end): the keys that queries [q0, q0 + rows) can meet (all when off).
  __device__ __forceinline__ int2 key_reach(int q0, int rows) const {
    if (!on()) return make_int2(0, INT_MAX);
    return reach(kv_ranges, seq_k, span(q_ranges, seq_q, q0, rows));
  }
  // [begin, end): the queries that keys [k0, k0 + cols) can meet (all when off).
  __device__ __forceinline__ int2 query_reach(int k0, int cols) const {
    if (!on()) return make_int2(0, INT_MAX);
    return reach(q_ranges, seq_q, span(kv_ranges, seq_k, k0, cols));
  }

  // False when no query of [q0, q0 + rows) can share a segment with a key of
  // [k0, k0 + cols): the pair of blocks is skipped.
  __device__ __forceinline__ bool blocks_meet(int q0, int rows, int k0, int cols) const {
    if (!on()) return true;
    const int2 q = span(q_ranges, seq_q, q0, rows), k = span(kv_ranges, seq_k, k0, cols);
    return q.x <= k.y && k.x <= q.y;
  }

  // True unless every query and key of the blocks carries one and the same id.
  __device__ __forceinline__ bool tile_needs_mask(int q0, int rows, int k0, int cols) const {
    if (!on()) return false;
    const int2 q = span(q_ranges, seq_q, q0, rows), k = span(kv_ranges, seq_k, k0, cols);
    return !(q.x == q.y && k.x == k.y && q.x == k.x);
  }

  // Whether query q and key k (k < seq_k) share a segment; rows past the end
  // are never written, so they count as seeing everything.
  __device__ __forceinline__ bool same(int q, int k) const {
    return !on() || q >= seq_q || __ldg(q_ids + q) == __ldg(kv_ids + k);
  }
};

}  // namespace jax_flash
