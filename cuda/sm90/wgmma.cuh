// wgmma.mma_async for one warpgroup: D[64 x N] (+)= A[64 x 16] * B[16 x N], fp32
// accumulators, 16-bit inputs. B is always a shared-memory descriptor; A is a
// descriptor (ss) or four registers per thread (rs) in the mma.m16n8k16 A layout.
// kTransA = 1 reads A M-major (its rows are k), kTransB = 1 reads B N-major;
// 0 reads them K-major (16-bit types allow both).
//
// D's registers follow the mma.m16n8k16 accumulator layout per warp (warp w of
// the warpgroup owns rows 16w..16w+15): element i of n8 tile j is d[4j + i].
// Inline assembly needs every register operand spelled out: the lists below
// name them per N, and one macro defines the instructions of a (type, N).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

// "%0, ..., %(N/2 - 1)": the accumulator operands of an N-wide product.
#define JAX_FLASH_WGMMA_D_32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define JAX_FLASH_WGMMA_D_64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define JAX_FLASH_WGMMA_D_128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define JAX_FLASH_WGMMA_D_256 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// The constraints binding d[0 .. N/2 - 1] to those operands.
#define JAX_FLASH_WGMMA_BIND_32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define JAX_FLASH_WGMMA_BIND_64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define JAX_FLASH_WGMMA_BIND_128 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define JAX_FLASH_WGMMA_BIND_256 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// The operands after D are numbered from R = N / 2 on: ss takes desc_a (R),
// desc_b (R+1), scale_d (R+2), the transposes (R+3, R+4); rs takes a[0..3]
// (R..R+3), desc_b (R+4), scale_d (R+5), trans-b (R+6).
#define JAX_FLASH_WGMMA_SS_TAIL_32 "}, %16, %17, p, 1, 1, %19, %20;\n}\n"
#define JAX_FLASH_WGMMA_SS_SCALE_32 "setp.ne.b32 p, %18, 0;\n"
#define JAX_FLASH_WGMMA_RS_TAIL_32 "}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
#define JAX_FLASH_WGMMA_RS_SCALE_32 "setp.ne.b32 p, %21, 0;\n"
#define JAX_FLASH_WGMMA_SS_TAIL_64 "}, %32, %33, p, 1, 1, %35, %36;\n}\n"
#define JAX_FLASH_WGMMA_SS_SCALE_64 "setp.ne.b32 p, %34, 0;\n"
#define JAX_FLASH_WGMMA_RS_TAIL_64 "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
#define JAX_FLASH_WGMMA_RS_SCALE_64 "setp.ne.b32 p, %37, 0;\n"
#define JAX_FLASH_WGMMA_SS_TAIL_128 "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
#define JAX_FLASH_WGMMA_SS_SCALE_128 "setp.ne.b32 p, %66, 0;\n"
#define JAX_FLASH_WGMMA_RS_TAIL_128 "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
#define JAX_FLASH_WGMMA_RS_SCALE_128 "setp.ne.b32 p, %69, 0;\n"
#define JAX_FLASH_WGMMA_SS_TAIL_256 "}, %128, %129, p, 1, 1, %131, %132;\n}\n"
#define JAX_FLASH_WGMMA_SS_SCALE_256 "setp.ne.b32 p, %130, 0;\n"
#define JAX_FLASH_WGMMA_RS_TAIL_256 "}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"
#define JAX_FLASH_WGMMA_RS_SCALE_256 "setp.ne.b32 p, %133, 0;\n"

#define JAX_FLASH_DEFINE_WGMMA(T, TYPE, N)                                                    \
  template <>                                                                                \
  struct Wgmma<T, N> {                                                                       \
    static constexpr int kRegs = N / 2;                                                      \
    template <int kTransA, int kTransB>                                                      \
    static __device__ __forceinline__ void ss(float (&d)[N / 2], uint64_t desc_a,            \
                                              uint64_t desc_b, int scale_d) {                \
      asm volatile("{\n.reg .pred p;\n" JAX_FLASH_WGMMA_SS_SCALE_##N                         \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {"      \
                   JAX_FLASH_WGMMA_D_##N JAX_FLASH_WGMMA_SS_TAIL_##N                         \
                   : JAX_FLASH_WGMMA_BIND_##N                                                \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));    \
    }                                                                                        \
    template <int kTransB>                                                                   \
    static __device__ __forceinline__ void rs(float (&d)[N / 2], const uint32_t (&a)[4],     \
                                              uint64_t desc_b, int scale_d) {                \
      asm volatile("{\n.reg .pred p;\n" JAX_FLASH_WGMMA_RS_SCALE_##N                         \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {"      \
                   JAX_FLASH_WGMMA_D_##N JAX_FLASH_WGMMA_RS_TAIL_##N                         \
                   : JAX_FLASH_WGMMA_BIND_##N                                                \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d),  \
                     "n"(kTransB));                                                          \
    }                                                                                        \
  };

namespace jax_flash::sm90 {

template <typename T, int N>
struct Wgmma;

JAX_FLASH_DEFINE_WGMMA(__nv_bfloat16, "bf16", 32)
JAX_FLASH_DEFINE_WGMMA(__nv_bfloat16, "bf16", 64)
JAX_FLASH_DEFINE_WGMMA(__nv_bfloat16, "bf16", 128)
JAX_FLASH_DEFINE_WGMMA(__nv_bfloat16, "bf16", 256)
JAX_FLASH_DEFINE_WGMMA(__half, "f16", 32)
JAX_FLASH_DEFINE_WGMMA(__half, "f16", 64)
JAX_FLASH_DEFINE_WGMMA(__half, "f16", 128)
JAX_FLASH_DEFINE_WGMMA(__half, "f16", 256)


// acc (+)= A B^T over the head dim, one commit group: A and B K-major (rows are m
// and n), in the 64-column panels of sw128_desc, of kARows and kBRows rows.
template <typename T, int N, int kD, int kARows, int kBRows>
__device__ __forceinline__ void wgmma_over_head_dim(float (&acc)[N / 2], uint64_t a_desc,
                                                    uint64_t b_desc) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint32_t a_off = (kk / 4) * kARows * 128 + (kk % 4) * 32;
    const uint32_t b_off = (kk / 4) * kBRows * 128 + (kk % 4) * 32;
    Wgmma<T, N>::template ss<0, 0>(acc, a_desc + (a_off >> 4), b_desc + (b_off >> 4), kk > 0);
  }
  wgmma_commit();
}

}  // namespace jax_flash::sm90
