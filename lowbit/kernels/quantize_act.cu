// quantize_act.cu — fused per-token activation quantize-and-pack for lowbit's GEMMs.
//
// One 256-thread block per token row x[row, 0:K] (float32, float16 or bfloat16, contiguous):
//   pass 1: the row statistic (amax, min/max, or Σ|x|) by a block reduction;
//   pass 2: quantize every k and write the packed row, zero-padded to `out_row` elements, in the
//           layouts of lowbit/ops/pack.py (one thread per k, coalesced; 4-bit pairs are joined by a
//           shuffle, 1-bit words and bit-planes by __ballot_sync: lane i -> bit i = lowest k first).
//
// Rounding is bit-exact with lowbit.ops.reference.quantize_act and hence with
// torch.fake_quantize_per_channel_affine: scale = max(stat, eps) / qmax (IEEE division),
// inv = 1/scale (correctly rounded reciprocal), q = clamp(rint(x * inv) (+ zero), qmin, qmax) with
// rint = round-half-to-even and no fused multiply-add anywhere. The one exception is the 1-bit
// scale mean|x|, a float sum whose order differs from torch's (the sign bits are exact).

#include "lowbit_common.cuh"

namespace lowbit {

enum QuantMode { kQ8 = 0, kQ4 = 1, kQ1 = 2, kPlanesSigned = 3, kPlanesUnsigned = 4 };

// Must equal lowbit.ops.reference.SCALE_EPS: all-zero rows get a positive scale and q = 0.
constexpr float kScaleEps = 1e-8f;

__device__ __forceinline__ float quant(float x, float inv, float zero, float qmin, float qmax) {
  const float q = rintf(__fmul_rn(x, inv)) + zero;
  return fminf(fmaxf(q, qmin), qmax);
}

// x >= 0 from the bits: CuPy compiles with -ftz=true, under which a float comparison would read a
// negative subnormal as -0 (and call it non-negative) where torch's x >= 0 does not.
__device__ __forceinline__ bool non_negative(float x) {
  const unsigned u = __float_as_uint(x);
  return (u >> 31) == 0u || (u & 0x7fffffffu) == 0u;
}

template <class IN, int MODE>
__device__ void quantize_row(const typename IN::storage* __restrict__ x, int K, void* __restrict__ out,
                             int out_row, float* __restrict__ scale_out, int* __restrict__ zero_out,
                             int* __restrict__ popc_out) {
  __shared__ float fscratch[32];
  __shared__ int iscratch[32];
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31;
  const typename IN::storage* xr = x + (long long)row * K;

  // ---- pass 1: the row statistic
  // s0: max|x|, Σ|x| or min(x); s1: max(x). Starting from 0 widens a min/max range to contain 0.
  float s0 = 0.0f, s1 = 0.0f;
  for (int k = tid; k < K; k += blockDim.x) {
    const float v = IN::load(xr + k);
    if constexpr (MODE == kQ1) s0 += fabsf(v);
    else if constexpr (MODE == kPlanesUnsigned) { s0 = fminf(s0, v); s1 = fmaxf(s1, v); }
    else s0 = fmaxf(s0, fabsf(v));
  }
  float scale, inv, zero = 0.0f, qmin, qmax;
  if constexpr (MODE == kQ1) {
    const float mean = __fdiv_rn(block_reduce<kSum>(s0, fscratch), (float)K);
    scale = fmaxf(mean, kScaleEps);  // XNOR-Net activation scale: mean|x| of the token
    inv = 0.0f; qmin = 0.0f; qmax = 0.0f;
  } else if constexpr (MODE == kPlanesUnsigned) {
    // range widened to contain 0 (the reduction starts from 0), unsigned 4-bit with zero point
    const float lo = block_reduce<kMin>(s0, fscratch), hi = block_reduce<kMax>(s1, fscratch);
    scale = __fdiv_rn(fmaxf(__fsub_rn(hi, lo), kScaleEps), 15.0f);
    inv = __frcp_rn(scale);
    zero = fminf(fmaxf(rintf(__fmul_rn(-lo, inv)), 0.0f), 15.0f);
    qmin = 0.0f; qmax = 15.0f;
  } else {
    const float qm = (MODE == kQ8) ? 127.0f : 7.0f;  // symmetric: scale = amax / qmax
    scale = __fdiv_rn(fmaxf(block_reduce<kMax>(s0, fscratch), kScaleEps), qm);
    inv = __frcp_rn(scale);
    qmin = -qm - 1.0f; qmax = qm;
  }
  if (tid == 0) {
    scale_out[row] = scale;
    if constexpr (MODE == kPlanesUnsigned) zero_out[row] = (int)zero;
  }

  // ---- pass 2: quantize and pack. Trip counts are uniform across the block, so every lane of
  // every warp reaches the shuffles/ballots; lanes past the row's end carry the pad value 0.
  if constexpr (MODE == kQ8) {
    signed char* o = reinterpret_cast<signed char*>(out) + (long long)row * out_row;
    for (int k = tid; k < out_row; k += blockDim.x) {
      o[k] = (signed char)(k < K ? (int)quant(IN::load(xr + k), inv, 0.0f, qmin, qmax) : 0);
    }
  } else if constexpr (MODE == kQ4) {
    unsigned char* o = reinterpret_cast<unsigned char*>(out) + (long long)row * out_row;
    const int n = 2 * out_row;  // nibbles
    for (int base = 0; base < n; base += blockDim.x) {
      const int k = base + tid;
      const int q = k < K ? (int)quant(IN::load(xr + k), inv, 0.0f, qmin, qmax) : 0;
      const unsigned nib = (unsigned)q & 0xFu;
      const unsigned odd = __shfl_down_sync(0xffffffffu, nib, 1);
      if ((k & 1) == 0 && k < n) o[k >> 1] = (unsigned char)(nib | (odd << 4));  // low nibble = even k
    }
  } else if constexpr (MODE == kQ1) {
    int* o = reinterpret_cast<int*>(out) + (long long)row * out_row;
    const int n = 32 * out_row;
    int ones = 0;
    for (int base = 0; base < n; base += blockDim.x) {
      const int k = base + tid;
      const bool bit = k < K && non_negative(IN::load(xr + k));  // sign(0) = +1, as pack_binary
      ones += bit;
      const unsigned word = __ballot_sync(0xffffffffu, bit);
      if (lane == 0 && k < n) o[k >> 5] = (int)word;
    }
    const int total = block_sum_int(ones, iscratch);
    if (tid == 0) popc_out[row] = total;
  } else {  // bit-planes of a 4-bit value: plane b holds bit b of the two's complement nibble
    int* o = reinterpret_cast<int*>(out) + (long long)row * 4 * out_row;
    const int n = 32 * out_row;
    int ones[4] = {0, 0, 0, 0};
    for (int base = 0; base < n; base += blockDim.x) {
      const int k = base + tid;
      const int q = k < K ? (int)quant(IN::load(xr + k), inv, zero, qmin, qmax) : 0;
      const unsigned u = (unsigned)q & 0xFu;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const bool bit = (u >> b) & 1u;
        ones[b] += bit;
        const unsigned word = __ballot_sync(0xffffffffu, bit);
        if (lane == 0 && k < n) o[b * out_row + (k >> 5)] = (int)word;
      }
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int total = block_sum_int(ones[b], iscratch);
      if (tid == 0) popc_out[row * 4 + b] = total;
    }
  }
}

}  // namespace lowbit

#define LOWBIT_QUANT_KERNEL(NAME, IN, MODE)                                                         \
  extern "C" __global__ void __launch_bounds__(256) NAME(                                          \
      const IN::storage* __restrict__ x, int K, void* __restrict__ out, int out_row,                 \
      float* __restrict__ scale, int* __restrict__ zero, int* __restrict__ popc) {                   \
    lowbit::quantize_row<IN, MODE>(x, K, out, out_row, scale, zero, popc);                          \
  }

#define LOWBIT_QUANT_ALL_INPUTS(MODENAME, MODE)                                    \
  LOWBIT_QUANT_KERNEL(lowbit_quant_##MODENAME##_f32, lowbit::InF32, MODE)          \
  LOWBIT_QUANT_KERNEL(lowbit_quant_##MODENAME##_f16, lowbit::InF16, MODE)          \
  LOWBIT_QUANT_KERNEL(lowbit_quant_##MODENAME##_bf16, lowbit::InBF16, MODE)

LOWBIT_QUANT_ALL_INPUTS(q8, lowbit::kQ8)
LOWBIT_QUANT_ALL_INPUTS(q4, lowbit::kQ4)
LOWBIT_QUANT_ALL_INPUTS(b1, lowbit::kQ1)
LOWBIT_QUANT_ALL_INPUTS(planes_s, lowbit::kPlanesSigned)
LOWBIT_QUANT_ALL_INPUTS(planes_u, lowbit::kPlanesUnsigned)
