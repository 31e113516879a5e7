// gemm_lowbit.cu — integer and binary GEMMs for lowbit's packed layouts (see lowbit/ops/pack.py).
//
//   out[m, n] = epilogue( Σ_k A[m, k] · B[n, k] )      A: activations [M, K], B: weights [N, K]
//
// One mainloop serves five operand pairs, all on Ampere-style tensor-core MMAs, which is what sm_90
// offers without wgmma (sm_90a is never targeted by CuPy's NVRTC call):
//
//   W8A8  A int8,    B int8     -> mma.m16n8k32.s8.s8
//   W4A8  A int8,    B 4-bit    -> nibbles widened to int8 in registers, then s8 MMA
//   W4A4  A 4-bit,   B 4-bit    -> both widened in registers (H100 has no s4 tensor cores)
//   W1A1  A 1-bit,   B 1-bit    -> mma.m16n8k256.b1.and.popc, ±1 identity in the epilogue
//   W1A4  A 4 planes,B 1-bit    -> the same b1 MMA on the [4M, K] plane matrix; the epilogue
//                                  combines the planes bit-serially with warp shuffles
//
// Tiling: a block computes BM x BN outputs with WARPS_M x WARPS_N warps; K advances in stages of
// 64 int8 values (64 bytes of int8, 32 bytes of packed 4-bit, 512 bits = 64 bytes of 1-bit),
// i.e. two MMAs per stage, copied global->shared by cp.async through a STAGES-deep ring.
//
// The k permutation. Inside a stage, thread t = lane%4 reads the 16 consecutive bytes 16t..16t+15
// of a row (one LDS.128; one LDS.64 for packed 4-bit) instead of using ldmatrix. The MMA's logical
// k index (slice c of the stage, word s of the fragment, byte j) is thereby mapped to the physical
// byte 16t + 8c + 4s + j. A dot product is invariant under a permutation of k applied to BOTH
// operands, and both operands of a GEMM are loaded with the same mapping (W4A4 uses a cheaper one
// for both, see load_slice), so the result is exact. The same instruction count as ldmatrix.x4,
// and no shared-memory bank conflicts for 64-byte rows (a quarter-warp reads two adjacent rows =
// 128 contiguous bytes) or 32-byte packed rows (half a warp reads four rows = 128 bytes).
//
// 4-bit widening: a nibble n moved into the high half of a byte is the int8 value 16·n (n signed),
// so "lo = (w << 4) & 0xF0F0F0F0, hi = w & 0xF0F0F0F0" widens 8 nibbles in 2 ALU ops. The
// accumulator is then 16·dot (W4A8) or 256·dot (W4A4), divided back exactly by an arithmetic shift.
// |16·n| <= 128, so the int32 accumulator bound is the int8 one (K < 2^17).
//
// Epilogue: the int32 fragments (W1A4: first combined over planes by warp shuffles) go to an
// int32 tile in shared memory; one row-major pass then applies the popcount identities / shifts,
// the float32 scales (x_scale[m] then w_scale[n], separately rounded, + bias) and the output
// conversion, with coalesced stores. The output type is a kernel argument.
//
// Bounds: rows beyond M / N and bytes beyond each row's length are zero-filled by cp.async
// (src-size 0), which is value-neutral for every format; the epilogue guards its stores. Rows must
// be whole 16-byte chunks (lowbit.ops.pack pads them so), the base pointers 16-byte aligned.

#include "lowbit_common.cuh"

namespace lowbit {

enum Fmt { kS8 = 0, kS4 = 1, kB1 = 2 };
enum Epi { kEpiScale = 0, kEpiW1A1 = 1, kEpiW1A4 = 2 };
// Output element type, a kernel argument; must match _OUT_KIND in lowbit/ops/cuda.py.
enum OutKind { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2, kOutI32 = 3 };

template <int F> struct FmtTraits;
template <> struct FmtTraits<kS8> { static const int kStageBytes = 64; };
template <> struct FmtTraits<kS4> { static const int kStageBytes = 32; };
template <> struct FmtTraits<kB1> { static const int kStageBytes = 64; };

// The 16 k values of one thread's slice of one row in a stage, as four int8x4 (or 4x32-bit binary)
// words ready for the MMA: words (0, 1) feed slice c = 0, words (2, 3) slice c = 1.
//   S8/B1: the bytes as they are (physical byte 16t + 4r + j in word r).
//   S4, LINEAR: widened so word r holds physical k 16t + 4r + j (matches an S8 partner's layout).
//   S4, not LINEAR: widened as [even k | odd k] per packed word — cheaper, valid only when both
//   operands are 4-bit and use this same mapping.
template <int F, bool LINEAR>
__device__ __forceinline__ void load_slice(const unsigned char* row_stage, int t, unsigned (&r)[4]) {
  if constexpr (F == kS4) {
    const u32x2 p = *reinterpret_cast<const u32x2*>(row_stage + 8 * t);
    const unsigned lo0 = (p.x << 4) & 0xF0F0F0F0u, hi0 = p.x & 0xF0F0F0F0u;
    const unsigned lo1 = (p.y << 4) & 0xF0F0F0F0u, hi1 = p.y & 0xF0F0F0F0u;
    if constexpr (LINEAR) {
      // byte i of p holds k = 2i (low nibble) and 2i+1 (high nibble): interleave back to k order
      r[0] = prmt(lo0, hi0, 0x5140u);
      r[1] = prmt(lo0, hi0, 0x7362u);
      r[2] = prmt(lo1, hi1, 0x5140u);
      r[3] = prmt(lo1, hi1, 0x7362u);
    } else {
      r[0] = lo0; r[1] = hi0; r[2] = lo1; r[3] = hi1;
    }
  } else {
    const u32x4 v = *reinterpret_cast<const u32x4*>(row_stage + 16 * t);
    r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
  }
}

template <int FA, int FB, int EPI, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct Gemm {
  static const int kThreads = 32 * WARPS_M * WARPS_N;
  static const int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  static const int MT = kWarpM / 16, NT = kWarpN / 8;
  static const int kASB = FmtTraits<FA>::kStageBytes, kBSB = FmtTraits<FB>::kStageBytes;
  static const int kAStage = BM * kASB, kBStage = BN * kBSB;
  // The epilogue stages the output tile as int32 through shared memory; +8 words per row keep
  // the fragment-order 64-bit writes free of bank conflicts (half a warp spans 4 rows).
  static const int kOutRows = (EPI == kEpiW1A4) ? BM / 4 : BM;
  static const int kTilePitch = BN + 8;
  static const int kPipeBytes = STAGES * (kAStage + kBStage);
  static const int kTileBytes = kOutRows * kTilePitch * 4;
  static const int kSmemBytes = kPipeBytes > kTileBytes ? kPipeBytes : kTileBytes;
  static const bool kBinary = (FA == kB1);
  // S4 widened to 16·n (one operand) or both (two operands): exact shift back in the epilogue.
  static const int kShift = (FA == kS4 ? 4 : 0) + (FB == kS4 ? 4 : 0);
  static const bool kLinearA = (FB != kS4), kLinearB = (FA != kS4);

  static_assert(BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0, "warp tiling");
  static_assert(FA != kB1 || FB == kB1, "binary A needs binary B");

  // Copy stage `kt` of the A and B tiles into ring slot `slot` (16-byte chunks, zero-filled past
  // the matrix edge or the row's end).
  static __device__ __forceinline__ void load_stage(
      unsigned char* smem, int slot, int kt, const unsigned char* A, const unsigned char* B,
      int m0, int n0, int a_rows, int b_rows, int a_row_bytes, int b_row_bytes) {
    const int tid = threadIdx.x;
    unsigned char* sa = smem + slot * (kAStage + kBStage);
    unsigned char* sb = sa + kAStage;
    const int a_chunks_per_row = kASB / 16, b_chunks_per_row = kBSB / 16;
    const int a_chunks = BM * a_chunks_per_row, b_chunks = BN * b_chunks_per_row;
#pragma unroll
    for (int i = 0; i < (a_chunks + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (a_chunks % kThreads != 0 && c >= a_chunks) break;
      const int row = c / a_chunks_per_row, col = (c % a_chunks_per_row) * 16;
      const int kbyte = kt * kASB + col;
      const bool ok = (m0 + row) < a_rows && kbyte < a_row_bytes;
      // 32-bit offsets (the host checks rows · row_bytes < 2^31): fewer live registers
      const unsigned char* src = A + (ok ? (m0 + row) * a_row_bytes + kbyte : 0);
      cp_async_16(smem_addr(sa + row * kASB + col), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < (b_chunks + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (b_chunks % kThreads != 0 && c >= b_chunks) break;
      const int row = c / b_chunks_per_row, col = (c % b_chunks_per_row) * 16;
      const int kbyte = kt * kBSB + col;
      const bool ok = (n0 + row) < b_rows && kbyte < b_row_bytes;
      const unsigned char* src = B + (ok ? (n0 + row) * b_row_bytes + kbyte : 0);
      cp_async_16(smem_addr(sb + row * kBSB + col), src, ok ? 16 : 0);
    }
  }

  // All MMAs of one stage for this warp's kWarpM x kWarpN sub-tile.
  static __device__ __forceinline__ void compute_stage(
      const unsigned char* smem, int slot, int wm, int wn, int g, int t, int (&acc)[MT][NT][4]) {
    const unsigned char* sa = smem + slot * (kAStage + kBStage);
    const unsigned char* sb = sa + kAStage;
    unsigned af[MT][2][4];  // [m tile][row g / g+8][word]: the warp's A slice, kept for the stage
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int r = wm * kWarpM + i * 16 + g;
      load_slice<FA, kLinearA>(sa + r * kASB, t, af[i][0]);
      load_slice<FA, kLinearA>(sa + (r + 8) * kASB, t, af[i][1]);
    }
    // B one n tile at a time (4 live registers instead of 4·NT): keeps the 128x128 tile under
    // the 128-register cap of two blocks per SM.
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      unsigned bf[4];
      load_slice<FB, kLinearB>(sb + (wn * kWarpN + j * 8 + g) * kBSB, t, bf);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const unsigned b[2] = {bf[2 * c], bf[2 * c + 1]};
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const unsigned a[4] = {af[i][0][2 * c], af[i][1][2 * c], af[i][0][2 * c + 1], af[i][1][2 * c + 1]};
          if constexpr (kBinary) mma_b1(acc[i][j], a, b);
          else mma_s8(acc[i][j], a, b);
        }
      }
    }
  }

  static __device__ __forceinline__ void run(
      const unsigned char* __restrict__ A, const unsigned char* __restrict__ B, void* __restrict__ out,
      const float* __restrict__ a_scale, const float* __restrict__ b_scale,
      const float* __restrict__ bias, const int* __restrict__ a_popc, const int* __restrict__ b_popc,
      const int* __restrict__ a_zero, int a_rows, int N, int a_row_bytes, int b_row_bytes, int KT,
      int k_true, int a_signed, int out_kind) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;

    // Grouped rasterisation (groups of 8 block-rows sweep N together) so that concurrently
    // running blocks share A and B tiles in L2.
    const int grid_m = (a_rows + BM - 1) / BM, grid_n = (N + BN - 1) / BN;
    const int group = 8, per_group = group * grid_n;
    const int pid = blockIdx.x, gid = pid / per_group, first_m = gid * group;
    const int gsize = min(grid_m - first_m, group);
    const int pid_m = first_m + (pid % per_group) % gsize, pid_n = (pid % per_group) / gsize;
    const int m0 = pid_m * BM, n0 = pid_n * BN;

    int acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

    // Multistage pipeline: STAGES-1 stages in flight while one is consumed.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < KT) load_stage(smem, s, s, A, B, m0, n0, a_rows, N, a_row_bytes, b_row_bytes);
      cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // stage kt visible to all; slot (kt-1)%STAGES no longer read by anyone
      const int next = kt + STAGES - 1;
      if (next < KT) load_stage(smem, next % STAGES, next, A, B, m0, n0, a_rows, N, a_row_bytes, b_row_bytes);
      cp_async_commit();
      compute_stage(smem, kt % STAGES, wm, wn, g, t, acc);
    }

    // ---- epilogue, phase 1: integer results -> shared memory (the pipeline's buffers are free
    // once every copy has landed and every warp has left the main loop).
    cp_async_wait<0>();
    __syncthreads();
    int* tile = reinterpret_cast<int*>(smem);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // h = 0: row g (acc e = 0, 1); h = 1: row g + 8 (e = 2, 3)
        const int r = wm * kWarpM + i * 16 + g + 8 * h;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int c = wn * kWarpN + j * 8 + 2 * t;
          int v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
          if constexpr (EPI == kEpiW1A4) {
            // Plane rows are 4·token + b; lanes 4 apart hold consecutive planes of one token.
            // Σ_k x_b·w_k = 2·popc(x_b & w_bits) - popc(x_b), weighted by the plane's
            // coefficient 2^b (-8 for the sign plane of two's complement), summed over b.
            const int b = g & 3;  // tile bases are multiples of 16, so row & 3 == g & 3
            const int coeff = (a_signed && b == 3) ? -8 : (1 << b);
            const int row = m0 + r;
            const int pa = row < a_rows ? a_popc[row] : 0;
            v0 = coeff * (2 * v0 - pa);
            v1 = coeff * (2 * v1 - pa);
            v0 += __shfl_xor_sync(0xffffffffu, v0, 4);
            v1 += __shfl_xor_sync(0xffffffffu, v1, 4);
            v0 += __shfl_xor_sync(0xffffffffu, v0, 8);
            v1 += __shfl_xor_sync(0xffffffffu, v1, 8);
            if (b == 0) *reinterpret_cast<i32x2*>(tile + (r >> 2) * kTilePitch + c) = i32x2{v0, v1};
          } else {
            *reinterpret_cast<i32x2*>(tile + r * kTilePitch + c) = i32x2{v0, v1};
          }
        }
      }
    }
    __syncthreads();

    // ---- phase 2: one pass over the tile in row-major order (coalesced stores), one copy of the
    // code for every output type.
    const int out_row0 = (EPI == kEpiW1A4) ? m0 / 4 : m0;
    const int out_rows = (EPI == kEpiW1A4) ? a_rows / 4 : a_rows;
    for (int idx = threadIdx.x; idx < kOutRows * BN; idx += kThreads) {
      const int r = idx / BN, c = idx % BN;
      const int row = out_row0 + r, col = n0 + c;
      if (row >= out_rows || col >= N) continue;
      int v = tile[r * kTilePitch + c];
      if constexpr (EPI == kEpiW1A1) {
        // ±1 dot = 4·popc(a&b) - 2·popc(a) - 2·popc(b) + K (the true K: pad bits are 0)
        v = 4 * v - 2 * a_popc[row] - 2 * b_popc[col] + k_true;
      } else if constexpr (EPI == kEpiW1A4) {
        // unsigned planes hold x + z: subtract z·Σ_k w_k = z·(2·popc(w) - K)
        if (!a_signed) v -= a_zero[row] * (2 * b_popc[col] - k_true);
      } else {
        v >>= kShift;  // exact: a widened 4-bit operand makes the sum a multiple of 2^kShift
      }
      const long long off = (long long)row * N + col;
      if (out_kind == kOutI32) {
        reinterpret_cast<int*>(out)[off] = v;
        continue;
      }
      // (float(acc) * x_scale) * w_scale (+ bias): separately rounded, as the torch reference
      float y = __fmul_rn(__fmul_rn(__int2float_rn(v), a_scale[row]), b_scale[col]);
      if (bias != nullptr) y = __fadd_rn(y, bias[col]);
      if (out_kind == kOutF32) {
        reinterpret_cast<float*>(out)[off] = y;
      } else {  // round to nearest even, as torch's .to(float16 / bfloat16)
        reinterpret_cast<unsigned short*>(out)[off] =
            out_kind == kOutF16 ? f32_to_f16_bits(y) : f32_to_bf16_bits(y);
      }
    }
  }
};

}  // namespace lowbit

// Tile configurations: L = 128x128 (8 warps of 64x32), S = 64x128 (8 warps of 32x32) for GEMMs
// whose 128x128 grid would leave most of the SMs idle. Four cp.async stages each; shared memory is
// the larger of the ring (64 KB / 48 KB for int8) and the epilogue's int32 tile (68 KB / 34 KB).
// __launch_bounds__(256, 2) caps registers at 128 so two blocks share an SM (16 warps to hide MMA
// and shared-memory latency). ptxas (CUDA 13.0, sm_90) reports no spills at that cap except a few
// bytes in w4a8_l; untuned on hardware so far.
#define LOWBIT_CFG_L 128, 128, 2, 4, 4
#define LOWBIT_CFG_S 64, 128, 2, 4, 4

#define LOWBIT_GEMM_KERNEL(NAME, FA, FB, EPI, ...)                                                 \
  extern "C" __global__ void __launch_bounds__(256, 2) NAME(                                       \
      const unsigned char* __restrict__ A, const unsigned char* __restrict__ B,                      \
      void* __restrict__ out, const float* __restrict__ a_scale, const float* __restrict__ b_scale,  \
      const float* __restrict__ bias, const int* __restrict__ a_popc,                                \
      const int* __restrict__ b_popc, const int* __restrict__ a_zero, int a_rows, int N,            \
      int a_row_bytes, int b_row_bytes, int KT, int k_true, int a_signed, int out_kind) {            \
    lowbit::Gemm<FA, FB, EPI, __VA_ARGS__>::run(A, B, out, a_scale, b_scale, bias, a_popc, b_popc,  \
                                                a_zero, a_rows, N, a_row_bytes, b_row_bytes, KT,    \
                                                k_true, a_signed, out_kind);                        \
  }

// One kernel per op and tile configuration: lowbit_gemm_<op>_<l|s>.
#define LOWBIT_GEMM_OP(OP, FA, FB, EPI)                                  \
  LOWBIT_GEMM_KERNEL(lowbit_gemm_##OP##_l, FA, FB, EPI, LOWBIT_CFG_L)    \
  LOWBIT_GEMM_KERNEL(lowbit_gemm_##OP##_s, FA, FB, EPI, LOWBIT_CFG_S)

// lowbit/ops/cuda.py compiles this file once per op with -DLOWBIT_OP_<NAME> (fewer kernels per
// NVRTC call); without any such define (the compile tests) every op is built.
#if !defined(LOWBIT_OP_W8A8) && !defined(LOWBIT_OP_W4A8) && !defined(LOWBIT_OP_W4A4) && \
    !defined(LOWBIT_OP_W1A1) && !defined(LOWBIT_OP_W1A4)
#define LOWBIT_OP_W8A8
#define LOWBIT_OP_W4A8
#define LOWBIT_OP_W4A4
#define LOWBIT_OP_W1A1
#define LOWBIT_OP_W1A4
#endif

#ifdef LOWBIT_OP_W8A8
LOWBIT_GEMM_OP(w8a8, lowbit::kS8, lowbit::kS8, lowbit::kEpiScale)
#endif
#ifdef LOWBIT_OP_W4A8
LOWBIT_GEMM_OP(w4a8, lowbit::kS8, lowbit::kS4, lowbit::kEpiScale)
#endif
#ifdef LOWBIT_OP_W4A4
LOWBIT_GEMM_OP(w4a4, lowbit::kS4, lowbit::kS4, lowbit::kEpiScale)
#endif
#ifdef LOWBIT_OP_W1A1
LOWBIT_GEMM_OP(w1a1, lowbit::kB1, lowbit::kB1, lowbit::kEpiW1A1)
#endif
#ifdef LOWBIT_OP_W1A4
LOWBIT_GEMM_OP(w1a4, lowbit::kB1, lowbit::kB1, lowbit::kEpiW1A4)
#endif
