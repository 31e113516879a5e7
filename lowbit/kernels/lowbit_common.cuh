// lowbit_common.cuh — PTX wrappers shared by lowbit's kernels.
//
// No #include on purpose: the same text is compiled by NVRTC through cupy.RawModule (which has no
// CUDA headers on its include path by default) and by nvcc in the tests. lowbit/ops/cuda.py
// inlines this file in place of its #include line, so CuPy's compile cache keys on the full text.
// Everything here needs sm_80+ (cp.async, mma.sync m16n8k32 s8 / m16n8k256 b1, cvt.rn.bf16.f32).
#pragma once

namespace lowbit {

// 16-byte aligned register bundles, so plain C++ loads from shared memory become LDS.128/LDS.64.
struct alignas(16) u32x4 { unsigned x, y, z, w; };
struct alignas(8) u32x2 { unsigned x, y; };
struct alignas(8) f32x2 { float x, y; };
struct alignas(8) i32x2 { int x, y; };

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  // cvta.to.shared: a generic pointer into shared memory -> the 32-bit shared address cp.async uses
  unsigned addr;
  asm volatile("{ .reg .u64 a64; cvta.to.shared.u64 a64, %1; cvt.u32.u64 %0, a64; }\n"
               : "=r"(addr) : "l"(p));
  return addr;
}

// 16-byte asynchronous global->shared copy, L2 only (.cg). src_bytes < 16 zero-fills the rest, so
// src_bytes = 0 writes 16 zero bytes: that is how out-of-range rows and K tails are padded.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// D = A·B + C, 16x8x32, int8 x int8 -> int32. Fragment layouts: PTX ISA, "Matrix Fragments for
// mma.m16n8k32" — in 32-bit words, A: {(g, t), (g+8, t), (g, t+4), (g+8, t+4)}, B: {(n=g, t),
// (n=g, t+4)} with g = lane/4, t = lane%4 and word t+4 meaning bytes 16+4t..16+4t+3 of the k32 slice.
__device__ __forceinline__ void mma_s8(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D = popc(A AND B) + C, 16x8x256 single-bit. Hopper has only the AND form (XOR was dropped), so
// the ±1 dot product is recovered in the epilogue from 4·popc(a&b) - 2·popc(a) - 2·popc(b) + K.
// The fragment layout in 32-bit words is the same as mma_s8's (a word holds 32 k instead of 4).
__device__ __forceinline__ void mma_b1(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
  unsigned d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// float -> 16-bit formats with round-to-nearest-even, as torch's .to(float16/bfloat16).
__device__ __forceinline__ unsigned short f32_to_f16_bits(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ float bf16_bits_to_f32(unsigned short h) {
  return __uint_as_float(static_cast<unsigned>(h) << 16);
}

// Input element types of the activation quantizers, by torch dtype.
struct InF32 {
  typedef float storage;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
};
struct InF16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ float load(const unsigned short* p) { return f16_bits_to_f32(*p); }
};
struct InBF16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ float load(const unsigned short* p) { return bf16_bits_to_f32(*p); }
};

// Output element types of the GEMM epilogues. store2 writes columns (c, c+1) of one row; the
// caller guarantees the pair is in range and 2-element aligned.
struct OutF32 {
  typedef float storage;
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  static __device__ __forceinline__ void store2(float* p, float a, float b) {
    *reinterpret_cast<f32x2*>(p) = f32x2{a, b};
  }
};
struct OutF16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ void store(unsigned short* p, float v) { *p = f32_to_f16_bits(v); }
  static __device__ __forceinline__ void store2(unsigned short* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = static_cast<unsigned>(f32_to_f16_bits(a)) |
                                      (static_cast<unsigned>(f32_to_f16_bits(b)) << 16);
  }
};
struct OutBF16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ void store(unsigned short* p, float v) { *p = f32_to_bf16_bits(v); }
  static __device__ __forceinline__ void store2(unsigned short* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = static_cast<unsigned>(f32_to_bf16_bits(a)) |
                                      (static_cast<unsigned>(f32_to_bf16_bits(b)) << 16);
  }
};

// Block-wide reductions for blockDim.x a multiple of 32 (<= 1024). `scratch` holds 32 values and
// is reused, hence the barrier before returning the broadcast result.
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

enum ReduceOp { kMax = 0, kMin = 1, kSum = 2 };

template <int OP>
__device__ __forceinline__ float warp_reduce(float v) {
  if (OP == kMax) return warp_max(v);
  if (OP == kMin) return warp_min(v);
  return warp_sum(v);
}

template <int OP>
__device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_reduce<OP>(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < nwarps ? scratch[lane] : scratch[0];  // scratch[0] is neutral for max/min
    if (OP == kSum && lane >= nwarps) w = 0.0f;
    w = warp_reduce<OP>(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const float r = scratch[0];
  __syncthreads();
  return r;
}

__device__ int block_sum_int(int v, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum_int(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? scratch[lane] : 0;
    w = warp_sum_int(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  const int r = scratch[0];
  __syncthreads();
  return r;
}

}  // namespace lowbit
